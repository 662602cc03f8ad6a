"""Streaming VAE decode equals the full decode."""

import dataclasses

import pytest
import torch

from engine.config import VAEConfig, get_preset
from engine.vae import VideoVAE

# The shapes layout: two stages, both halving time and space (4x spatial, 4x temporal), at tiny widths.
STRIDE4 = dataclasses.replace(get_preset("tiny").vae, dim_mult=(1, 2, 2), temperal_downsample=(True, True),
                              scale_factor_spatial=4)


def randomised(seed, cfg=None):
    vae = VideoVAE.from_config(cfg or get_preset("tiny").vae, seed=seed)
    with torch.no_grad():  # make the decoder's output depend on everything (default init is near-trivial)
        for p in vae.vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


# The shapes-t2 layout: time halved in the second stage only (2 frames a latent frame).
TEMPORAL2 = dataclasses.replace(STRIDE4, temperal_downsample=(False, True), scale_factor_temporal=2)


@pytest.mark.parametrize("cfg", [None, STRIDE4, TEMPORAL2], ids=["stride8", "stride4", "temporal2"])
def test_streaming_decode_equals_full_decode(cfg):
    vae = randomised(0, cfg)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 7, 5, 3, generator=g)  # odd latent sizes
    full = vae.decode(z)
    s, t = vae.spatial, vae.temporal
    assert full.shape == (1, 3, 1 + t * 6, 5 * s, 3 * s)
    for sizes in [(1, 1, 1, 1, 1, 1, 1), (3, 3, 1), (2, 5)]:
        dec = vae.stream()
        parts = [dec.decode(c) for c in z.split(list(sizes), dim=2)]
        assert [p.shape[2] for p in parts] == [1 + t * (sizes[0] - 1)] + [t * n for n in sizes[1:]]
        torch.testing.assert_close(torch.cat(parts, 2), full, rtol=0, atol=0)


def test_temporal2_encode_frames_and_latent_frames():
    """1 + 4k frames (Wan's encoder takes 4-frame groups after the first) -> 1 + 2k latent frames."""
    vae = randomised(3, TEMPORAL2)
    x = torch.rand(2, 3, 9, 12, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 4, 5, 3, 2)
    assert vae.decode(z).shape == (2, 3, 9, 12, 8)


def test_two_streams_share_one_vae_independently():
    vae = randomised(2)
    g = torch.Generator().manual_seed(3)
    za, zb = torch.randn(1, 4, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, 4, generator=g)
    da, db = vae.stream(), vae.stream()
    out_a, out_b = [], []
    for i in range(0, 4, 2):  # interleave the two streams chunk by chunk
        out_a.append(da.decode(za[:, :, i:i + 2]))
        out_b.append(db.decode(zb[:, :, i:i + 2]))
    torch.testing.assert_close(torch.cat(out_a, 2), vae.decode(za), rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(out_b, 2), vae.decode(zb), rtol=0, atol=0)
    da.reset()  # a reset stream starts a new clip
    torch.testing.assert_close(da.decode(zb), vae.decode(zb), rtol=0, atol=0)


def test_save_load_round_trip_and_encode_shape(tmp_path):
    vae = randomised(4)
    vae.save(tmp_path / "vae")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").exists()
    again = VideoVAE.from_folder(tmp_path / "vae")
    z = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(again.decode(z), vae.decode(z), rtol=0, atol=1e-6)
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    assert vae.encode(video).shape == (1, 4, 3, 4, 4)


def test_shapes_vae_strides_and_bad_configs():
    vae = randomised(6, STRIDE4)
    assert (vae.temporal, vae.spatial) == (4, 4)
    assert vae.encode(torch.rand(1, 3, 9, 32, 24) * 2 - 1).shape == (1, 4, 3, 8, 6)
    assert get_preset("shapes").latent_hw == (16, 16) and get_preset("shapes").tokens_per_frame == 16
    with pytest.raises(ValueError, match="scale_factor_spatial must be 4"):
        VAEConfig(dim_mult=(1, 2, 2), temperal_downsample=(True, True))
    with pytest.raises(ValueError, match="scale_factor_temporal must be 2"):
        VAEConfig(temperal_downsample=(False, False, True))
    with pytest.raises(ValueError, match="one entry per downsampling stage"):
        VAEConfig(dim_mult=(1, 2), temperal_downsample=(True, True))


def test_a_loaded_vae_saves_without_its_source_path(tmp_path):
    """Re-exporting a VAE read from a folder must not write that (local) folder into the new config.json."""
    import json

    VideoVAE.from_config(get_preset("tiny").vae).save(tmp_path / "a")
    VideoVAE.from_folder(tmp_path / "a").save(tmp_path / "b")
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    assert "_name_or_path" not in b and a == b


# ---- the CPU fast paths (engine/vae.py: oneDNN convolutions, the channel RMS norm) ----------------------------


def test_onednn_conv3d_equals_torch_conv3d_on_random_inputs():
    import os

    import torch.nn.functional as F

    from engine.vae import ONEDNN_MIN_ELEMENTS, conv3d, onednn_wins

    seed = int.from_bytes(os.urandom(2), "little")
    g = torch.Generator().manual_seed(seed)
    cases = [((1, 12, 4, 35, 29), (7, 12, 3, 3, 3), (0, 1, 1), (1, 1, 1)),  # odd sizes, padding
             ((1, 5, 3, 35, 41), (9, 5, 3, 1, 3), (0, 0, 1), (1, 2, 1)),  # an odd kernel and a stride
             ((1, 6, 5, 23, 37), (4, 6, 3, 3, 3), (1, 1, 1), (1, 1, 1))]
    for xs, ws, pad, stride in cases:
        x, w, b = torch.randn(xs, generator=g), torch.randn(ws, generator=g), torch.randn(ws[0], generator=g)
        assert x.numel() > ONEDNN_MIN_ELEMENTS and onednn_wins(x, w)
        want = F.conv3d(x, w, b, stride, pad)
        torch.testing.assert_close(conv3d(x, w, b, stride, pad), want, rtol=1e-4, atol=1e-4, msg=f"seed={seed}")
        torch.testing.assert_close(conv3d(x, w, None, stride, pad), F.conv3d(x, w, None, stride, pad),
                                   rtol=1e-4, atol=1e-4, msg=f"seed={seed}")
    # where PyTorch's own path is as fast or the op has no business: small inputs, 1x1x1 kernels, other dtypes, and
    # anything whose gradient is needed (training)
    big, w3 = torch.randn(1, 12, 4, 34, 34), torch.randn(12, 12, 3, 3, 3)
    assert onednn_wins(big, w3)
    assert not onednn_wins(torch.randn(1, 8, 3, 18, 18), torch.randn(8, 8, 3, 3, 3))
    assert not onednn_wins(big, torch.randn(12, 12, 1, 1, 1))
    assert not onednn_wins(big.double(), w3.double())
    assert not onednn_wins(big, w3.clone().requires_grad_())
    assert not onednn_wins(big.expand(2, -1, -1, -1, -1), w3)  # a batch: PyTorch takes oneDNN by itself
    with torch.no_grad():
        assert onednn_wins(big, w3.clone().requires_grad_())


def test_channel_rms_norm_equals_normalize_over_channels():
    import torch.nn.functional as F

    from engine.vae import channel_rms_norm

    x = torch.randn(2, 7, 3, 9, 5)
    x[0, :, 1, 2, 3] = 0.0  # an all-zero channel vector: the eps floor, no division by zero
    got = channel_rms_norm(x)
    torch.testing.assert_close(got, F.normalize(x, dim=1), rtol=1e-6, atol=1e-7)
    assert got[0, :, 1, 2, 3].abs().max() == 0


def test_fast_cpu_vae_decodes_what_diffusers_modules_decode(monkeypatch):
    """The shipped layout at its real widths (so the full-resolution convs cross the oneDNN threshold): the whole
    decode and a chunk-per-call stream with the fast paths equal diffusers' own modules up to float rounding."""
    import engine.vae as ev

    vae = randomised(7, get_preset("shapes-t2").vae)
    used, real = [], ev.onednn_wins

    def counted(x, w, groups=1):
        used.append(real(x, w, groups))
        return used[-1]

    monkeypatch.setattr(ev, "onednn_wins", counted)
    z = torch.randn(1, 8, 7, 16, 16, generator=torch.Generator().manual_seed(8))
    vae.fast_cpu = False
    want = vae.decode(z)
    assert not used  # off: not even consulted
    vae.fast_cpu = True
    got = vae.decode(z)
    assert any(used) and not all(used)  # the large convs go to oneDNN, the small ones stay
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    dec = vae.stream(None)  # the engine's: each call's frames at once
    streamed = torch.cat([dec.decode(c) for c in z.split([1, 3, 3], dim=2)], 2)
    torch.testing.assert_close(streamed, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="frames_per_call"):
        vae.stream(0)
