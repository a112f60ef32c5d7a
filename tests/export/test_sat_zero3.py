"""`cogtune convert sat` on SwissArmyTransformer ZeRO-3 saves and on save folders with EMA copies.

The ZeRO-3 save is real: tests/helpers/sat_zero3_train.py trains a module whose state-dict names are SAT's under a
DeepSpeed ZeRO-3 engine on 2 CPU ranks and writes each rank's partitions as SAT's save_ds_checkpoint_no_optim does
(z3_rank_RR_model_states.pt); DeepSpeed's own GatheredParameters gives the reference. The EMA and single-rank cases
write the same published layout by hand (tests/helpers/sat.py write_z3).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from cogtune.cli import build_parser
from cogtune.errors import CogtuneError
from cogtune.export.sat import SAT_PREFIX, convert_sat, sat_to_diffusers
from cogtune.export.sat_zero3 import gather_z3
from helpers.sat import run_sat_zero3, to_sat, write_z3

FREQS = f"{SAT_PREFIX}mixins.pos_embed.freqs_sin"  # 5B's RoPE table: a buffer, whole on every rank


def sat_of(tiny_model, variant="cogvideox-5b", seed=None) -> tuple[dict[str, torch.Tensor], object]:
    t = CogVideoXTransformer3DModel.from_pretrained(str(tiny_model(variant) / "transformer"))
    sd = t.state_dict()
    if seed is not None:  # a different set of weights of the same model (the EMA copy)
        gen = torch.Generator().manual_seed(seed)
        sd = {k: torch.randn(v.shape, generator=gen) for k, v in sd.items()}
    return to_sat(sd, t.config.num_layers, t.config.use_rotary_positional_embeddings), t


def cli(argv):
    args = build_parser("convert").parse_args(["convert", "sat", *map(str, argv)])
    args.func(args)


def refused(match: str, *argv) -> str:
    with pytest.raises(CogtuneError, match=match) as err:
        cli(argv)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.fixture(scope="module")
def z3_save(tiny_model, tmp_path_factory):
    pytest.importorskip("deepspeed")
    sat, _ = sat_of(tiny_model)
    return run_sat_zero3(sat, tmp_path_factory.mktemp("sat-z3"), buffers=(FREQS,))


@pytest.mark.slow
@pytest.mark.multiproc
def test_real_zero3_save_gathers_exactly(z3_save, tmp_path, capsys):
    save, ref = z3_save
    assert sorted(p.name for p in (save / "6").iterdir()) == ["z3_rank_00_model_states.pt",
                                                              "z3_rank_01_model_states.pt"]
    got = gather_z3(save / "6")
    assert got.keys() == ref.keys()
    for k, t in ref.items():  # fp32 partitions, gathered: bit-equal to what DeepSpeed itself gathers
        assert got[k].dtype == torch.float32 and torch.equal(got[k], t), k
    odd = ref["first_stage_model.encoder.conv_in.weight"]
    assert odd.numel() % 2 == 1  # the last rank's partition was padded

    cli([save, tmp_path / "out", "--max-shard-size", "40KB"])  # the save folder: latest -> 6/
    assert f"converting {save / '6'} (ZeRO-3 shards of 2 rank(s))\n" in capsys.readouterr().out
    converted = CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / "out")).state_dict()
    expected, _ = sat_to_diffusers({k: v for k, v in ref.items() if k.startswith(SAT_PREFIX)})
    assert converted.keys() == expected.keys()
    for k, t in expected.items():
        assert torch.equal(converted[k], t), k
    start = torch.load(save.parent / "tensors.pt", weights_only=True)
    moved = [k for k in start if k.startswith(SAT_PREFIX) and not torch.equal(start[k], ref[k])]
    assert len(moved) == len(start) - 2  # it trained: all but the RoPE buffer (and the frozen VAE weight)


@pytest.mark.slow
@pytest.mark.multiproc
def test_incomplete_or_mixed_zero3_saves_are_refused(z3_save, tiny_model, tmp_path):
    save, _ = z3_save
    out = tmp_path / "out"
    broken = tmp_path / "save"
    shutil.copytree(save, broken)
    it = broken / "6"

    (it / "z3_rank_01_model_states.pt").rename(tmp_path / "rank1.pt")  # what SAT itself writes: rank 0's only
    msg = refused(r"holds \d+ of its \d+ elements, a share for 2 ranks, but .* has 1 z3_rank file\(s\): ranks are "
                  "missing or extra", broken, out)
    assert "data-parallel rank 0" in msg
    (tmp_path / "rank1.pt").rename(it / "z3_rank_02_model_states.pt")
    refused(r"z3_rank files for ranks 1 are missing \(found 0, 2\)", broken, out)
    shutil.copy(it / "z3_rank_02_model_states.pt", it / "z3_rank_01_model_states.pt")
    refused(r"a share for 2 ranks, but .* has 3 z3_rank file\(s\)", broken, out)  # an extra rank
    (it / "z3_rank_02_model_states.pt").unlink()

    other, _ = sat_of(tiny_model, "cogvideox-5b-i2v")  # the same names, other shapes: another model's save
    write_z3(other, tmp_path / "other", world=2)
    shutil.copy(tmp_path / "other" / "z3_rank_01_model_states.pt", it / "z3_rank_01_model_states.pt")
    refused("files of different saves are mixed", broken, out)
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written


def test_single_rank_zero3_and_ema_folders(tiny_model, tmp_path, capsys):
    """SAT's save folder with EMA: latest -> 1000, 1000/ and 1000-ema/ beside it (here ZeRO-3 of one rank, the
    single-GPU case, whose one file holds every tensor whole but flat)."""
    plain, _ = sat_of(tiny_model)
    ema, _ = sat_of(tiny_model, seed=7)
    save = tmp_path / "save"
    write_z3(plain, save / "1000", world=1, buffers=(FREQS,))
    write_z3(ema, save / "1000-ema", world=1, buffers=(FREQS,))
    (save / "latest").write_text("1000")
    write_z3(plain, tmp_path / "three", world=3, buffers=(FREQS,))  # 3 ranks: every size 3 does not divide ends in padding
    got = gather_z3(tmp_path / "three")
    assert got.keys() == plain.keys() and all(torch.equal(got[k], plain[k]) for k in plain)

    def converted(out):
        return CogVideoXTransformer3DModel.from_pretrained(str(out)).state_dict()

    cli([save, tmp_path / "plain"])
    printed = capsys.readouterr().out
    assert f"converting {save / '1000'} (ZeRO-3 shards of 1 rank(s), plain weights; the EMA weights are beside it " \
           f"in {save / '1000-ema'}" in printed
    cli([save, tmp_path / "ema", "--ema"])
    assert f"converting {save / '1000-ema'} (ZeRO-3 shards of 1 rank(s), EMA weights)" in capsys.readouterr().out
    for out, sat in ((tmp_path / "plain", plain), (tmp_path / "ema", ema)):
        expected, _ = sat_to_diffusers({k: v for k, v in sat.items() if k.startswith(SAT_PREFIX)})
        got = converted(out)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    cli([save / "1000-ema", tmp_path / "ema2"])  # the EMA folder itself
    assert "EMA weights" in capsys.readouterr().out

    out = tmp_path / "out"
    refused("--ema picks the <iteration>-ema/ folder of a SAT save folder, but .* is one checkpoint",
            save / "1000", out, "--ema")
    (save / "latest").write_text("1000-ema")  # SAT writes latest = 1000-ema, then 1000: an interrupted save
    refused("latest names 1000-ema, the EMA copy .*: pass .*1000-ema for the EMA weights or .*1000 for the plain",
            save, out)
    (save / "latest").unlink()
    cli([save, tmp_path / "nolatest"])  # one iteration: no doubt which
    write_z3(plain, save / "2000", world=1)
    refused(r"holds iterations 1000, 2000 and no `latest` file to pick one: pass .*2000", save, out)
    (save / "latest").write_text("2000")
    refused(r"--ema: .*2000-ema does not exist or holds no weights", save, out, "--ema")
    assert not out.exists()


def test_mp_rank_save_with_ema(tiny_model, tmp_path, capsys):
    """The ZeRO-1/2 layout (DeepSpeed's mp_rank_00_model_states.pt, whole tensors) with its EMA copy."""
    plain, _ = sat_of(tiny_model)
    ema, _ = sat_of(tiny_model, seed=3)
    for tag, sat in (("10", plain), ("10-ema", ema)):
        (tmp_path / "save" / tag).mkdir(parents=True)
        torch.save({"module": sat, "iteration": 10}, tmp_path / "save" / tag / "mp_rank_00_model_states.pt")
    (tmp_path / "save" / "latest").write_text("10\n")
    convert_sat(tmp_path / "save", tmp_path / "out", ema=True)
    assert f"converting {tmp_path / 'save' / '10-ema' / 'mp_rank_00_model_states.pt'} (EMA weights)" in \
        capsys.readouterr().out
    got = CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / "out")).state_dict()
    expected, _ = sat_to_diffusers({k: v for k, v in ema.items() if k.startswith(SAT_PREFIX)})
    assert all(torch.equal(got[k], expected[k]) for k in expected)
