"""The streaming engine. Importing it first imports `kernels`, which on a machine without CUDA sets
TRITON_INTERPRET=1 before diffusers (or anything else) imports triton."""

import kernels as _kernels  # noqa: F401
