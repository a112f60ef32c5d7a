"""data.ram_cache_gb: cached entries stay in RAM after their first read, within the budget, and read the same."""

from __future__ import annotations

import torch

from cogtune.models import load_spec
from cogtune.train.encode import prepare_data
from conftest import tiny_train_config


def _data(tiny_model, synth_data, out, gb):
    cfg = tiny_train_config(tiny_model("cogvideox-5b"), synth_data, out, data__ram_cache_gb=gb)
    return prepare_data(load_spec(cfg.model.path), cfg, progress=False).dataset


def test_entries_kept_within_the_budget_read_the_same(tiny_model, synth_data, tmp_path):
    disk = _data(tiny_model, synth_data, tmp_path / "a", 0)
    ram = _data(tiny_model, synth_data, tmp_path / "b", 1)
    n = len(disk)
    first = [disk[i] for i in range(n)]
    assert not disk.all_in_ram and not ram.all_in_ram  # nothing is read before the first epoch
    for _ in range(2):
        for i in range(n):
            got = ram[i]
            assert got.keys() == first[i].keys()
            for k, v in got.items():
                assert torch.equal(v, first[i][k]) if isinstance(v, torch.Tensor) else v == first[i][k]
    assert ram.all_in_ram and not disk.all_in_ram
    # the budget holds: one clip's tensors plus its embedding, and no more
    item = first[0]
    one = sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))
    small = _data(tiny_model, synth_data, tmp_path / "c", (one + 1) / 2**30)
    for i in range(n):
        small[i]
    assert len(small._videos) == 1 and small.ram_left >= 0
