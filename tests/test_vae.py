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
