# Before any test module imports diffusers (which imports triton when it is installed): on a machine without
# CUDA, `kernels` sets TRITON_INTERPRET=1, and triton reads it once, at its own import.
import kernels  # noqa: F401
