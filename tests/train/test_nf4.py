"""memory.nf4_weights (QLoRA): frozen Linear weights in NF4 give the forward of their dequantised weights, train
LoRA adapters that save as the same file as without it and load on the unquantised base, resume exactly, and
refuse, in one line, what cannot work."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cogtune.errors import CogtuneError
from cogtune.train.loop import train
from cogtune.train.metrics import read_metrics
from conftest import tiny_train_config

pytest.importorskip("torchao")

NF4 = {"memory__nf4_weights": True, "memory__gradient_checkpointing": True}


def _inputs(spec_like, seed=0):
    """Transformer inputs of the tiny 5B model at its native size (9 frames, 32×32)."""
    gen = torch.Generator().manual_seed(seed)
    c = spec_like.config
    frames = (c.sample_frames - 1) // c.temporal_compression_ratio + 1
    latents = torch.randn(1, frames, c.in_channels, c.sample_height, c.sample_width, generator=gen)
    text = torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=gen)
    return dict(hidden_states=latents, encoder_hidden_states=text,
                timestep=torch.tensor([500]), return_dict=False)


def _quantised(model):
    from cogtune.models import facts_of_transformer
    from cogtune.train.memory import nf4_storage

    q = copy.deepcopy(model)
    nf4_storage(q, torch.device("cpu"), facts_of_transformer(q).fp8_skip)
    return q


def _nf4_weights(model) -> dict:
    from torchao.quantization import NF4Tensor

    return {n: m.weight for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), NF4Tensor)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_the_dequantised_weights_forward(tiny_model, dtype):
    from diffusers import CogVideoXTransformer3DModel

    full = CogVideoXTransformer3DModel.from_pretrained(str(tiny_model("cogvideox-5b") / "transformer")).eval()
    full.requires_grad_(False).to(dtype)  # frozen, as under LoRA (only frozen weights are quantised), in its dtype
    nf4 = _quantised(full)
    stored = _nf4_weights(nf4)
    assert len(stored) >= 8  # every block's attention and feed-forward Linear at least
    dequantised = copy.deepcopy(full)
    for name, w in stored.items():
        dequantised.get_submodule(name).weight.data = w.get_original_weight()
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in _inputs(full).items()}
    with torch.no_grad():
        ref, q, dq = (m(**inputs)[0].float() for m in (full, nf4, dequantised))
    # the same weights (NF4 dequantises to the dtype it was made from) through the same ops, except that NF4's
    # linear adds the bias after the matmul instead of inside it: one more rounding of each quantised Linear's
    # output, at most an ulp of the dtype (eps: 2^-23 fp32, 2^-7 bf16) relative, summed over the layers in series
    in_series = 4 * full.config.num_layers  # q/k/v side by side, out projection, two feed-forward Linears
    ulp = torch.finfo(dtype).eps
    assert ((q - dq).norm() / dq.norm()).item() <= in_series * ulp
    # the gap to the unquantised model comes from the weight error: to first order a sum over the quantised layers
    # a signal crosses in series, each adding at most its relative weight error (a Linear's relative output error is
    # below ||ΔW|| / ||W|| in the spectral sense; Frobenius norms stand in for it, the max over layers for each
    # term)
    errors = {n: ((w.get_original_weight().float() - full.get_submodule(n).weight.float()).norm() /
                  full.get_submodule(n).weight.float().norm()).item() for n, w in stored.items()}
    worst = max(errors.values())
    assert 0.01 < worst < 0.2  # 16 levels over each block's absmax: a few percent, never tens
    gap = ((q - ref).norm() / ref.norm()).item()
    assert 1e-4 < gap <= in_series * worst  # measured: 0.008 against a bound of 0.74 (residuals carry most signal)


def test_backward_keeps_nf4_weights_not_dequantised_copies(tiny_model):
    """What the planner assumes (no compute-dtype weight copies held for backward): autograd saves each quantised
    Linear's NF4 tensor, and no full-size tensor of a quantised weight's shape."""
    from diffusers import CogVideoXTransformer3DModel
    from torchao.quantization import NF4Tensor

    from cogtune.train.lora import add_lora

    model = CogVideoXTransformer3DModel.from_pretrained(str(tiny_model("cogvideox-5b") / "transformer"))
    add_lora(model, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    model = _quantised(model)
    stored = _nf4_weights(model)
    shapes = {tuple(w.shape) for w in stored.values()} | {tuple(w.shape)[::-1] for w in stored.values()}
    nf4, copies = set(), []

    def pack(t):
        if isinstance(t, NF4Tensor):
            nf4.add(id(t))
        elif t.dim() == 2 and tuple(t.shape) in shapes and not t.requires_grad:
            copies.append(tuple(t.shape))
        return t

    inputs = _inputs(model)
    inputs["hidden_states"].requires_grad_(True)  # so block 0's q/k/v inputs need a gradient too
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)[0]
    assert nf4 == {id(w) for w in stored.values()} and not copies
    out.square().mean().backward()  # and backward runs through them, to the adapters only
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    assert all(w.grad is None for w in stored.values())

def _run(tiny_model, synth_data, out, **kw):
    cfg = tiny_train_config(tiny_model("cogvideox-5b"), synth_data, out, optimizer__lr=5e-3, **kw)
    result = train(cfg)
    losses = {r["step"]: r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r}
    return result, losses


def _file(path):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    return {k: (tuple(v.shape), v.dtype) for k, v in load_file(str(path)).items()}, meta


@pytest.mark.slow
def test_qlora_trains_saves_the_same_file_and_loads_on_the_full_base(tiny_model, synth_data, tmp_path):
    from diffusers import CogVideoXPipeline

    result, losses = _run(tiny_model, synth_data, tmp_path / "nf4", max_steps=3, **NF4)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert len(_nf4_weights(result.transformer)) >= 8  # the run really trained on NF4 weights
    plain, _ = _run(tiny_model, synth_data, tmp_path / "plain", max_steps=3, memory__gradient_checkpointing=True)
    (shapes, meta), (plain_shapes, plain_meta) = _file(result.lora_path), _file(plain.lora_path)
    assert shapes == plain_shapes  # keys, shapes and dtypes (fp32)
    assert meta == plain_meta  # the peft config diffusers reads (the scale), and every cogtune.* key
    trained = {k: v for k, v in load_file(str(result.lora_path)).items()}
    assert max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k) > 1e-4  # adapters moved from 0

    pipe = CogVideoXPipeline.from_pretrained(str(tiny_model("cogvideox-5b")))
    pipe.load_lora_weights(str(result.lora_path.parent), weight_name=result.lora_path.name, adapter_name="q")
    # each adapted layer's delta (B·A·alpha/r) is the trained adapter's, on the unquantised base
    loaded = {n: m for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and "q" in m.lora_A}
    ours = {n: m for n, m in result.transformer.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert loaded.keys() == ours.keys() and loaded
    for name in ours:
        torch.testing.assert_close(loaded[name].get_delta_weight("q"), ours[name].get_delta_weight("default"),
                                   rtol=1e-6, atol=1e-7, msg=name)
    # and the whole model: the loaded pipeline, quantised the way training quantised, is the trained model
    inputs = _inputs(pipe.transformer)
    with torch.no_grad():
        want = result.transformer(**inputs)[0]
        got = _quantised(pipe.transformer)(**inputs)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_losses(tiny_model, synth_data, tmp_path):
    kw = dict(NF4, checkpoint__every_steps=2, max_steps=4)
    _, straight = _run(tiny_model, synth_data, tmp_path / "a", **kw)
    _run(tiny_model, synth_data, tmp_path / "b", **{**kw, "max_steps": 2})
    _, resumed = _run(tiny_model, synth_data, tmp_path / "b", resume="latest", **kw)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert [resumed[s] for s in (3, 4)] == pytest.approx([straight[s] for s in (3, 4)], rel=1e-6)


@pytest.mark.parametrize("switches,match", [
    ({"method": "sft"}, r"^memory.nf4_weights .* needs method: lora$"),
    ({"memory__fp8_weights": True}, r"^memory.nf4_weights .* cannot work with memory.fp8_weights"),
    ({"memory__block_offload": True}, r"^memory.nf4_weights .* cannot work with memory.block_offload"),
])
def test_impossible_combinations_are_one_line_before_caching(tiny_model, synth_data, tmp_path, switches, match):
    cfg = tiny_train_config(tiny_model("cogvideox-5b"), synth_data, tmp_path / "run", data__cache_dir=tmp_path / "c",
                            memory__nf4_weights=True, **switches)
    with pytest.raises(CogtuneError, match=match) as info:
        train(cfg)
    assert "\n" not in str(info.value) and not (tmp_path / "c").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("strategy,world", [("zero2", 1), ("zero3", 2), ("fsdp2", 2), ("zero2_offload", 1)])
def test_zero_and_fsdp2_are_refused(strategy, world):
    from cogtune.config import switch_conflicts

    why = switch_conflicts(lora=True, checkpointing=True, activation_offload=False, fp8_weights=False,
                           block_offload=False, optimizer_in_backward=False, world=world, strategy=strategy,
                           accumulation=1, clipping=True, fp16=False, nf4_weights=True)
    assert len(why) == 1 and "use ddp or one process" in why[0] and "\n" not in why[0]


def test_missing_torchao_is_one_line(tiny_model, synth_data, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)  # what an uninstalled package looks like to import
    cfg = tiny_train_config(tiny_model("cogvideox-5b"), synth_data, tmp_path / "run", **NF4)
    with pytest.raises(CogtuneError, match=r"^memory.nf4_weights needs the torchao package: pip install") as info:
        train(cfg)
    assert "\n" not in str(info.value)


def test_plan_prices_nf4(tiny_model, tmp_path, capsys):
    from cogtune.cli import main
    from cogtune.config import load_config
    from cogtune.plan import GiB, Switches, plan_memory
    from cogtune.plan.memory import NF4_BYTES, model_stats

    tree = {"model": {"path": str(tmp_path / "absent"), "variant": "cogvideox-5b"}, "data": {"root": str(tmp_path)},
            "output_dir": str(tmp_path / "out"), "mixed_precision": "bf16", "lora": {"rank": 64, "alpha": 64}}
    cfg = load_config(None, [], base=tree)
    _, st = model_stats(cfg)
    ckpt = dict(gradient_checkpointing=True)
    bf16, nf4 = (plan_memory(cfg, switches=Switches(**ckpt, nf4_weights=q)) for q in (False, True))
    quantised = st.layers * st.block_nf4 + st.outside_nf4
    assert quantised > 0.7 * st.params  # the blocks' Linear weights are most of the model
    saved = bf16.parts["frozen"] - nf4.parts["frozen"]
    assert saved == pytest.approx(quantised * (2 - NF4_BYTES))
    assert nf4.total < bf16.total - 5 * GiB  # 5B: ~10.4 GB of bf16 weights become ~3.8
    # the CLI's table: the frozen weights' row shrinks by the same amount
    import yaml

    rows = {}
    for q in (False, True):
        cfg_file = tmp_path / f"nf4_{q}.yaml"
        cfg_file.write_text(yaml.safe_dump({**tree, "memory": {"nf4_weights": q, "gradient_checkpointing": True}}))
        assert main(["plan", str(cfg_file)]) in (0, None)
        out = capsys.readouterr().out
        assert ("frozen Linear weights in NF4" in out) == q
        rows[q] = next(line for line in out.splitlines() if line.startswith("frozen weights")).split()
    assert float(rows[False][2]) - float(rows[True][2]) == pytest.approx(saved / GiB, abs=0.01)


@pytest.mark.slow
@pytest.mark.multiproc
def test_ddp_trains_like_one_process_with_accumulation(tiny_model, synth_data, tmp_path):
    """Each rank quantises the same base the same way: 2 ranks × batch 1 see what 1 rank × 2 accumulated micro-batches
    see (tests/train/test_distributed.py says why the curves compare, within 1e-4)."""
    import os
    import subprocess
    import sys

    import yaml

    tree = {"model": {"path": str(tiny_model("cogvideox-5b"))}, "data": {"root": str(synth_data)},
            "lora": {"rank": 8, "alpha": 8}, "optimizer": {"lr": 1e-3}, "max_steps": 3, "mixed_precision": "no",
            "validation": {"heldout_loss": False}, "memory": {"nf4_weights": True, "gradient_checkpointing": True}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tree))
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    curves = {}
    for name, extra in (("two", ["--nproc", "2"]), ("one", ["gradient_accumulation_steps=2"])):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "-m", "cogtune", "train", str(config), f"output_dir={out}", *extra],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        curves[name] = {r["step"]: r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r}
    assert sorted(curves["two"]) == [1, 2, 3]
    assert [curves["two"][s] for s in (1, 2, 3)] == pytest.approx([curves["one"][s] for s in (1, 2, 3)], rel=1e-4)


@pytest.mark.slow
def test_planner_matches_live_tensor_bytes_of_an_nf4_step():
    """benchmarks/gpu_memory.py's CPU path (the peak of live tensor bytes, NF4's inner tensors counted) on a
    scaled-down 5B LoRA with checkpointing, bf16 and NF4 weights, against the planner's training peak."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[2]
    cmd = [sys.executable, str(root / "benchmarks" / "gpu_memory.py"), "--tiny", "--layers", "4", "--heads", "8",
           "--frames", "9", "--height", "96", "--width", "160", "--steps", "1", "--switches", "ckpt,ckpt+nf4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root,
                          env=os.environ | {"PYTHONPATH": str(root / "src")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {r["config"]: r for r in (json.loads(ln[7:]) for ln in proc.stdout.splitlines()
                                        if ln.startswith("RESULT "))}
    assert sorted(results) == ["ckpt", "ckpt+nf4"], proc.stdout[-2000:]
    for r in results.values():
        assert 0.9 < r["allocated"] / r["predicted"] < 1.1, r  # measured: 1.01, 1.01 (without ckpt: 1.02)
    assert results["ckpt+nf4"]["allocated"] < results["ckpt"]["allocated"]
