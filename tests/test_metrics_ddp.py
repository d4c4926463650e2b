"""Two processes (torch.distributed, gloo) accumulate exactly what one process does.

One spawned run covers every metric family (process start-up costs seconds). The samples are
split unevenly and interleaved across the ranks, and rank 1 sees no sample at all for the
reconstruction metric, so the test also covers out-of-order gathering and an idle rank.
"""

import math
import os
import pickle
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def _samples(n=13, h=16, w=20, seed=0):
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for k in range(n):
        t = np.zeros((h, w), bool)
        if k % 4 != 0:  # every 4th target is empty (no-target samples for GRES)
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            t[y : y + rng.integers(1, 8), x : x + rng.integers(1, 10)] = True
        p = np.roll(t, int(rng.integers(-2, 3)), axis=1)
        if k % 5 == 4:  # a scattered prediction (k = 4: on a no-target sample)
            p = rng.random((h, w)) < 0.1
        if k % 6 == 0:
            p[:] = False
        preds.append(torch.from_numpy(p))
        targets.append(torch.from_numpy(t))
    return preds, targets


def _gcg_images(n=7, h=16, w=20, seed=1):
    rng = np.random.default_rng(seed)
    words = ["man", "dog", "red car", "tree", "the sky", "a woman", "grass"]
    images = []
    for k in range(n):
        gts, preds, gp, pp = [], [], [], []
        for _ in range(int(rng.integers(1, 4))):
            m = np.zeros((h, w), bool)
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            m[y : y + rng.integers(2, 8), x : x + rng.integers(2, 10)] = True
            gts.append(m)
            gp.append(str(rng.choice(words)))
        for g, phrase in zip(gts, gp):
            if rng.random() < 0.8:
                preds.append(np.roll(g, int(rng.integers(-1, 2)), axis=0))
                pp.append(phrase if rng.random() < 0.7 else str(rng.choice(words)))
        if k % 3 == 0:
            preds.append(rng.random((h, w)) < 0.05)
            pp.append("extra")
        to_stack = lambda ms: torch.from_numpy(np.stack(ms)) if ms else torch.zeros(0, h, w, dtype=torch.bool)
        images.append({
            "pred": to_stack(preds), "gt": to_stack(gts), "pp": pp, "gp": gp,
            "cap": " and ".join(pp) or "nothing", "ref": [" and ".join(gp), "a photo"], "id": 100 + 3 * k,
        })
    return images


def _run_all(rank=None, world_size=1):
    """Update every metric with this rank's share of the data (everything when rank is None)."""
    from samtok.eval.metrics import GCGMetric, GRESMetric, MaskReconstructionMetric, MultiRoundMetric, RESMetric

    preds, targets = _samples()
    n = len(preds)
    mine = list(range(n)) if rank is None else [k for k in range(n) if k % world_size == rank]
    # RES / GRES / multi-round: interleaved, in two updates per rank
    res, gres, multi = RESMetric(), GRESMetric(), MultiRoundMetric()
    for chunk in (mine[: len(mine) // 2], mine[len(mine) // 2 :]):
        if not chunk:
            continue
        res.update([preds[k] for k in chunk], [targets[k] for k in chunk])
        gres.update([preds[k] for k in chunk], [targets[k] for k in chunk])
        multi.update([preds[k] for k in chunk], [targets[k] for k in chunk], [1 + k % 10 for k in chunk])
    # reconstruction: rank 1 gets nothing at all
    recon = MaskReconstructionMetric()
    if rank in (None, 0):
        recon.update(preds, targets)
    # GCG: interleaved with image ids (AP50's tie order then depends on ids, not on gathering)
    images = _gcg_images()
    gcg = GCGMetric()
    sel = [im for k, im in enumerate(images) if rank is None or k % world_size == rank]
    gcg.update(
        [im["pred"] for im in sel], [im["gt"] for im in sel], [im["pp"] for im in sel], [im["gp"] for im in sel],
        [im["cap"] for im in sel], [im["ref"] for im in sel], image_ids=[im["id"] for im in sel],
    )
    return {
        "res": res.compute(), "gres": gres.compute(), "multi": multi.compute(),
        "recon": recon.compute(), "gcg": gcg.compute(),
    }


def _worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        import warnings

        warnings.simplefilter("ignore")
        results = _run_all(rank, world_size)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
    finally:
        dist.destroy_process_group()


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_exactly(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _run_all()
    ctx = mp.spawn(_worker, args=(WORLD_SIZE, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish within 180 s")
    for rank in range(WORLD_SIZE):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            got = pickle.load(f)
        for family, values in expected.items():
            assert set(got[family]) == set(values), family
            diff = {k: (got[family][k], v) for k, v in values.items() if not _same(got[family][k], v)}
            assert not diff, f"rank {rank}, {family}: {diff}"
    # the data really exercise the interesting cases
    assert expected["gres"]["TP"] > 0 and expected["gres"]["FN"] > 0 and expected["gres"]["FP"] > 0
    assert 0 < expected["gcg"]["AP50"] < 1 and 0 < expected["gcg"]["recall"] < 1
