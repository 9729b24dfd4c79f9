"""The multi-host path: two processes on this machine (jax.distributed over localhost, CPU
collectives through gloo, two forced CPU devices each) train a tiny configuration with
runner.fit on one global mesh of four devices and end with the parameters of a one-process run."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from idguard_jax import config
from idguard_jax.data import datasets as data
from idguard_jax.protection import faces as protect
from idguard_jax.training.frozen import init_frozen_random
from idguard_jax.training.runner import fit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    from idguard_jax.training.runner import fit, initialize_distributed, process_rows, data_mesh
    initialize_distributed(f"localhost:{PORT}", 2, int(sys.argv[1]))
    import jax
    from idguard_jax import config
    from idguard_jax.data import datasets as data
    from idguard_jax.training.frozen import init_frozen_random
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    cfg = config.tiny(targets=("stargan",), batch_size=4, num_steps=2, strategy="kpi")
    rows = process_rows(data_mesh(), cfg.batch_size)
    print("ROWS", jax.process_index(), rows.start, rows.stop, flush=True)
    frozen = init_frozen_random(cfg, jax.random.key(1))
    faces = data.folder_dataset(FACES, 32, seed=0, limit=8)
    fit(cfg, faces, frozen, WORKDIR, progress=False)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(shared_faces_dir, tmp_path):
    script = (WORKER.replace("PORT", str(_free_port())).replace("FACES", repr(shared_faces_dir))
              .replace("WORKDIR", repr(str(tmp_path / "multi"))))
    env = {**os.environ, "PYTHONPATH": REPO}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    # each process fed only its own half of every batch
    rows = sorted(tuple(int(v) for v in line.split()[1:]) for out, _ in outs
                  for line in out.splitlines() if line.startswith("ROWS"))
    assert rows == [(0, 0, 2), (1, 2, 4)]

    cfg = config.tiny(targets=("stargan",), batch_size=4, num_steps=2, strategy="kpi")
    frozen = init_frozen_random(cfg, jax.random.key(1))
    faces = data.folder_dataset(shared_faces_dir, 32, seed=0, limit=8)
    fit(cfg, faces, frozen, str(tmp_path / "single"), log=lambda line: None, progress=False)

    multi, single = (protect.load(tmp_path / d / "generator") for d in ("multi", "single"))
    # after two Adam steps: float32 reduction-order noise, well under one step (lr = 1e-4)
    for a, b in zip(jax.tree.leaves((multi.variables, multi.delta_p)),
                    jax.tree.leaves((single.variables, single.delta_p)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    # process 0 alone wrote the metrics, one line per step, with the one-process losses
    lines = [json.loads(x) for x in open(tmp_path / "multi" / "metrics.jsonl")]
    ref = [json.loads(x) for x in open(tmp_path / "single" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2]
    for got, want in zip(lines, ref):
        np.testing.assert_allclose(got["stargan/loss"], want["stargan/loss"], rtol=1e-5)
