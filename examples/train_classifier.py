"""The README's demo: `pilot up`, a digits classifier trained with DDP on its 2 workers, live
metrics, the held-out images classified in parallel, the accuracy, stop.

Run it with ``./scripts/demo`` (which makes the venv and installs torch and scikit-learn), or
``python examples/train_classifier.py``. The data is scikit-learn's bundled digits images
(1,797 8x8 images that ship inside the package, no download); every process loads it and
makes the same split. Training is ``client.train``: 2 ranks, each a fresh process on a worker
with ``torch.distributed`` set up, a ``DistributedSampler`` giving each its half of every
epoch, ``pilot.train.report`` streaming the metrics printed here and ``pilot.train.checkpoint``
keeping the latest state in the gateway. Inference is ``client.map`` over batches of the
held-out images, the model built once per worker process by ``pilot.cached``; its labels are
checked against one process's. The same job as a notebook: notebooks/train-classifier.ipynb.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pilot
from gateway.protocol import OutputKind

EPOCHS = 20
BATCH_PER_RANK = 32  # a global batch of 64 on 2 ranks
RANKS = 2
CHECKPOINT_EVERY = 5  # epochs
TEST_BATCH = 40  # held-out images per inference item
TARGET_ACCURACY = 0.95
READY_TIMEOUT_S = 60.0
TRAIN_TIMEOUT_S = 600.0  # two ranks importing torch on a small, busy machine
MAP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0


# -- what the workers run (shipped by value: this module is __main__) -------------------------


def digits_split() -> tuple[Any, Any, Any, Any]:
    """``x_train, y_train, x_test, y_test``: pixels scaled to [0, 1], a fixed fifth held out."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = len(y) // 5
    return x[order[n_test:]], y[order[n_test:]], x[order[:n_test]], y[order[:n_test]]


def make_model() -> Any:
    import torch

    torch.manual_seed(0)  # every rank starts from the same weights
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def train(epochs: int, batch_per_rank: int) -> dict[str, Any]:
    """One rank: DDP training from the latest checkpoint (after a restart) or from scratch;
    returns the trained weights (a state dict)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    import pilot.train as pt

    x_train, y_train, x_test, y_test = digits_split()
    model = DDP(make_model())  # the process group is already initialised
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = 0
    if (state := pt.restore()) is not None:
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["epoch"] + 1
    data = TensorDataset(x_train, y_train)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=batch_per_rank, sampler=sampler)
    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            accuracy = (model.module(x_test).argmax(dim=1) == y_test).float().mean().item()
        pt.report(step=epoch, loss=loss.item(), accuracy=accuracy)
        if (epoch + 1) % CHECKPOINT_EVERY == 0:
            pt.checkpoint(
                {"epoch": epoch, "model": model.module.state_dict(), "opt": opt.state_dict()}
            )
    if dist.get_rank() == 0:
        print(f"trained {epochs} epochs on {dist.get_world_size()} ranks")
    return model.module.state_dict()


def load_model(weights: dict[str, Any]) -> Any:
    model = make_model()
    model.load_state_dict(weights)
    return model.eval()


def classify(batch: Any, *, weights: dict[str, Any], key: str) -> tuple[int, int, list[int]]:
    """One item of the inference map: the batch's labels, with the process id and the model's
    ``id()`` (one model per process shows as one id per pid)."""
    import torch

    model = pilot.cached(("digits", key), lambda: load_model(weights))
    with torch.no_grad():
        labels = model(batch).argmax(dim=1).tolist()
    return os.getpid(), id(model), labels


# -- the demo ---------------------------------------------------------------------------------


def run_training(client: pilot.Client) -> dict[str, Any]:
    """Train with live metrics; returns rank 0's weights after checking every rank's agree."""
    import torch

    n_train = len(digits_split()[1])
    print(
        f"training a digits classifier ({n_train:,} 8x8 images) with DDP: {RANKS} ranks, "
        f"{EPOCHS} epochs, a global batch of {BATCH_PER_RANK * RANKS}; live metrics:"
    )
    t0 = time.perf_counter()
    job = client.train(train, EPOCHS, BATCH_PER_RANK, ranks=RANKS, restarts=1)
    first_report = None
    for out in job.stream():
        if out.kind == OutputKind.METRICS:
            m = out.data
            first_report = first_report or time.perf_counter() - t0
            if m["rank"] == 0:  # DDP keeps the ranks in step: rank 0 speaks for the epoch
                line = f"  epoch {m['step'] + 1:2d}/{EPOCHS}  loss {m['loss']:.4f}"
                print(f"{line}  held-out accuracy {m['accuracy']:.3f}")
        elif out.kind == OutputKind.CHECKPOINT:
            print(f"  [rank {out.index}] checkpoint {out.item} kept ({out.data.size / 1e3:.0f} kB)")
        elif out.kind in (OutputKind.STDOUT, OutputKind.STDERR):
            print(f"  {out.data.decode(errors='replace').rstrip()}")
    job.wait(TRAIN_TIMEOUT_S)
    took = time.perf_counter() - t0
    weights, *others = job.results
    for other in others:
        assert all(torch.equal(weights[k], other[k]) for k in weights), "the ranks disagree"
    workers = {t.worker for t in job.tasks.values()}
    print(
        f"trained in {took:.1f}s (first report after {first_report:.1f}s) on {len(workers)} "
        f"workers; {len(job.metrics)} reports kept; the ranks' weights are identical\n"
    )
    return weights


def run_inference(client: pilot.Client, weights: dict[str, Any]) -> float:
    """Classify the held-out images on the workers; returns the accuracy after checking the
    labels against one process's."""
    import torch

    _, _, x_test, y_test = digits_split()
    batches = [x_test[i : i + TEST_BATCH] for i in range(0, len(x_test), TEST_BATCH)]
    key = hashlib.sha256(b"".join(v.numpy().tobytes() for v in weights.values())).hexdigest()
    print(f"classifying {len(y_test)} held-out images in {len(batches)} batches on the workers")
    t0 = time.perf_counter()
    job = client.map(functools.partial(classify, weights=weights, key=key), batches, chunk=1)
    predicted = job.wait(MAP_TIMEOUT_S).results
    took = time.perf_counter() - t0

    local = load_model(weights)
    with torch.no_grad():
        expected = [local(b).argmax(dim=1).tolist() for b in batches]
    assert [labels for _, _, labels in predicted] == expected, "the workers disagree"
    models: dict[int, set[int]] = {}
    for pid, model_id, _ in predicted:
        models.setdefault(pid, set()).add(model_id)
    assert all(len(ids) == 1 for ids in models.values()), f"a model built twice: {models}"
    labels = torch.tensor([label for _, _, batch in predicted for label in batch])
    right = int((labels == y_test).sum())
    print(
        f"  done in {took:.1f}s by {len(models)} worker processes, one model each "
        "(pilot.cached); the labels equal one process's"
    )
    accuracy = right / len(y_test)
    print(f"\naccuracy on the held-out images: {accuracy:.3f} ({right}/{len(y_test)})")
    return accuracy


def main() -> int:
    home = os.environ.setdefault("PILOT_HOME", os.path.expanduser("~/.pilot"))
    print(f"$ pilot up --workers 2        (PILOT_HOME={home})")
    t0 = time.perf_counter()
    quiet = {**os.environ, "PILOT_LOG_LEVEL": os.environ.get("PILOT_LOG_LEVEL", "WARNING")}
    up = subprocess.Popen([sys.executable, "-m", "pilot", "up", "--workers", "2"], env=quiet)
    try:
        client = _connect_when_ready(deadline=time.monotonic() + READY_TIMEOUT_S)
        client.wait_for_workers(2, timeout=READY_TIMEOUT_S)
        print(f"gateway and 2 workers ready after {time.perf_counter() - t0:.2f}s\n")
        weights = run_training(client)
        accuracy = run_inference(client, weights)
        client.close()
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(STOP_TIMEOUT_S)
    print(f"pilot up stopped cleanly (exit code {code}).")
    if accuracy < TARGET_ACCURACY:
        print(f"accuracy below {TARGET_ACCURACY}: something is wrong", file=sys.stderr)
        return 1
    return 0 if code == 0 else 1


def _connect_when_ready(deadline: float) -> pilot.Client:
    """`pilot up` writes the connection file once its gateway listens."""
    while True:
        try:
            return pilot.connect()
        except pilot.NoGateway:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # poll interval under the deadline


if __name__ == "__main__":
    sys.exit(main())
