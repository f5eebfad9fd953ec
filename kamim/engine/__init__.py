"""Training engines.

* :mod:`kamim.engine.pretrain` — ``pretrain(cfg, data, out_dir, resume)``, the SimMIM / KAMIM / MoCo
  loop (accumulation, per-optimizer-step schedule, clipping, bf16, DDP, resume, NaN guard, logging);
* :mod:`kamim.engine.sampler` — deterministic, resumable, world-size independent data order;
* :mod:`kamim.engine.sweep` — the KAMIM (detector x weight patch size x temperature) grid.

The functions are not re-exported here on purpose: ``kamim.engine.pretrain`` stays the module
(so ``monkeypatch``/``mock.patch`` paths and ``import kamim.engine.pretrain as m`` work).
"""
