"""launch.dispatch.select, the one function that picks a kernel: every choice it makes, for every kind
of kernel on every architecture the tiles are chosen for, is a registry entry (so the NVRTC gate
compiles it) with the registry's block size and shared memory, and a grid within the launch limits.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from cupy_cosattn import problem
from cupy_cosattn.launch import dispatch, limits, registry, tiles

REGISTRY = {(s.source, s.name): s for s in registry.kernel_registry()}
DEVICES = [limits.DeviceCaps((8, 0), lim, 108) for lim in sorted(set(limits.SMEM_OPTIN_BY_ARCH.values()))]


def _problem(dtype: str, D: int, **kw) -> problem.Problem:
    dt = problem.BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    base = dict(B=2, H=4, Hk=2, Nq=70, Nk=130, D=D, dtype=dt)
    return problem.Problem(**{**base, **kw})


@pytest.mark.parametrize("dtype", limits.KERNEL_DTYPES)
def test_every_choice_is_a_registry_entry(dtype):
    for D, caps, (causal, layout, det, l2n) in itertools.product(
            (8, 40, 64, 128, 144, 200, 256), DEVICES,
            itertools.product((False, True), (problem.BIAS_NONE, problem.BIAS_PER_HEAD), (False, True), (False, True))):
        prob = _problem(dtype, D, causal=causal, bias_layout=layout, deterministic=det, l2norm_qk=l2n)
        for kind in dispatch.KINDS:
            c = dispatch.select(prob, caps, kind, scale=np.full(prob.H, 8.0))
            spec = REGISTRY.get((c.spec.source, c.spec.name))
            assert spec == c.spec, (kind, D, caps.smem_optin, c.spec)
            assert all(g >= 1 for g in c.grid) and c.grid[1] <= limits.GRID_YZ_LIMIT, (kind, c.grid)
            assert c.n_y >= c.grid[1]


def test_forward_variant_follows_the_logit_bound():
    caps = DEVICES[-1]
    prob = _problem("float16", 64)
    fixed = dispatch.select(prob, caps, dispatch.FORWARD, scale=np.full(4, 8.0))
    running = dispatch.select(prob, caps, dispatch.FORWARD, scale=np.full(4, 16.0))  # bound 16 > 10
    assert fixed.spec.name.endswith("false>") and running.spec.name.endswith("true>")
    assert fixed.tile == running.tile == tiles.fwd_block_n("float16", 64, caps.smem_optin)
    with pytest.raises(TypeError, match="scale"):
        dispatch.select(prob, caps, dispatch.FORWARD)
    with pytest.raises(ValueError, match="kernel kind"):
        dispatch.select(prob, caps, "bwd_everything")


def test_dkdv_splits_query_heads_to_fill_the_device(monkeypatch):
    prob = _problem("float32", 32, B=1, H=6, Hk=2, Nq=16, Nk=16)
    assert dispatch.select(prob, DEVICES[0], dispatch.DKDV).nsplit == 3  # one key tile: split all the way
    monkeypatch.setattr(tiles, "TARGET_BLOCKS", 1)
    c = dispatch.select(prob, DEVICES[0], dispatch.DKDV)
    assert c.nsplit == 1 and c.n_y == prob.B * prob.Hk


def test_grid_y_is_capped_and_the_work_items_are_not(monkeypatch):
    monkeypatch.setattr(limits, "GRID_YZ_LIMIT", 2)
    prob = _problem("float16", 64, B=3, H=3, Hk=1)
    for kind in (dispatch.FORWARD, dispatch.PREP, dispatch.DQ):
        c = dispatch.select(prob, DEVICES[0], kind, scale=np.full(3, 8.0))
        assert c.grid[1] == 2 and c.n_y == 9


def test_small_devices_get_small_tiles():
    sm86 = limits.DeviceCaps((8, 6), limits.SMEM_OPTIN_BY_ARCH["sm_86"], 84)
    prob = dataclasses.replace(_problem("float32", 192), deterministic=True)
    kv = dispatch.select(prob, sm86, dispatch.DKDV)
    assert kv.spec.name.endswith(", true>") and kv.smem <= sm86.smem_optin
    assert not dispatch.select(prob, DEVICES[-1], dispatch.DKDV).spec.name.endswith(", true>")
