"""Analysis benchmark: ours (torch, vectorised, streaming) vs notebook-style analysis code.

Part 1 (metrics): ``--images`` synthetic images of 192 px through the geometry of a ViT-S/16
(12x12 tokens + CLS, 6 heads, width 384), streamed in batches of ``--batch``. For mean attention
distance, NMI, Fourier and (minibatch, unbiased) CKA it times

* ours: the :mod:`analysis` accumulators (torch float32, cached vectorised distance matrix,
  chunked single-sweep attention statistics, anti-diagonal Fourier projection, bounded memory), and
* notebook-style: what the cl-vs-mim / KAMIM notebooks do, per batch: the distance matrix rebuilt
  with O(N^2) Python loops, float64 numpy, Python loops over CKA layer pairs,

asserts that both give the same numbers (allclose) and prints the time ratio LAST.
Fairness: synthetic inputs are generated per batch from a seeded generator and both sides get the
same values (the notebook side as float64 numpy copies, made before timing); torch and numpy's
BLAS run at the same thread count (``--threads``, via threadpoolctl; numpy's elementwise ops and
FFT are single-threaded anyway); ``--torch-threads N`` lets ours alone use N cores (what a user
of the library gets from the machine; the notebook side cannot use them), reported separately;
every metric is timed for both sides back to back on the same batch, alternating which goes
first. Wall-clock and per-thread CPU time are both reported, with the load average: on a shared
machine the CPU-time ratio is the steadier one (with more torch threads, only wall time counts).

Part 2 (memory): peak RSS while streaming ours over 100 vs ``--images`` images (fresh process,
high-water mark reset after the imports), with glibc's default malloc and with a fixed mmap
threshold (see ``FIXED_MMAP_THRESHOLD``).

Part 2b (memory of the product): peak RSS of ``kamim-analyze run`` itself (every analysis but
attribution, ViT-S/16 at 96 px) over 100 vs ``--pipeline-images`` crops of real photographs
written as PNG files, glibc's default malloc.

Part 3 (suite, skipped with ``--suite-images 0``): ``run_analyses`` with every cheap analysis
(all but attribution) on crops of real photographs (scikit-image / scikit-learn samples) through a
randomly initialised ``vit_small_patch16_224`` at 192 px, against a plain forward pass; attribution
is timed separately on ``map_images`` images.

    python bench/bench_analysis.py --images 1000 --suite-images 200 --threads 1
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from analysis.attention import AttentionDistance, AttentionNMI
from analysis.fourier import FourierAccumulator
from analysis.similarity import CKAAccumulator

GRID, PATCH, PREFIX, HEADS, WIDTH, CKA_LAYERS = 12, 16, 1, 6, 384, 13


# ---- synthetic inputs (deterministic per batch index) --------------------------------------------------

def synthetic_batch(index: int, batch: int, attn_layers: int, token_layers: int, seed: int = 0):
    """Attention with per-head locality, spatially correlated tokens, correlated pooled CKA features."""
    g = torch.Generator().manual_seed(seed * 100003 + index)
    n = PREFIX + GRID * GRID
    ys, xs = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    dist = torch.zeros(n, n)
    dist[PREFIX:, PREFIX:] = torch.cdist(coords, coords)
    attns = []
    for _ in range(attn_layers):
        width = torch.linspace(0.5, 6.0, HEADS)[None, :, None, None]
        logits = torch.randn(batch, HEADS, n, n, generator=g) - dist / width
        attns.append(logits.softmax(-1))
    tokens = []
    for _ in range(token_layers):
        t = torch.randn(batch, GRID, GRID, WIDTH, generator=g)
        t = t.cumsum(1).cumsum(2) / GRID  # low-frequency content -> a non-flat spectrum
        tokens.append(torch.cat([torch.randn(batch, PREFIX, WIDTH, generator=g), t.reshape(batch, -1, WIDTH)], 1) + 3.0)
    base = torch.randn(batch, WIDTH, generator=g)
    feats = []
    for layer in range(CKA_LAYERS):
        mix = layer / CKA_LAYERS
        feats.append((1 - mix) * base + mix * torch.randn(batch, WIDTH, generator=g) + 5.0)
    return attns, tokens, feats


# ---- notebook-style reference implementations -----------------------------------------------------------

def nb_distance_matrix(patch_size: int, num_patches: int, length: int) -> np.ndarray:
    distance_matrix = np.zeros((num_patches, num_patches))
    for i in range(num_patches):
        for j in range(num_patches):
            if i == j:
                continue
            xi, yi = int(i / length), i % length
            xj, yj = int(j / length), j % length
            distance_matrix[i, j] = patch_size * np.linalg.norm([xi - xj, yi - yj])
    return distance_matrix


def nb_attention_distance(attn: np.ndarray, patch_size: int, num_cls_tokens: int = 1) -> np.ndarray:
    """Per image and head, like the notebooks (plus the row renormalisation of the reference formula)."""
    attn = attn[..., num_cls_tokens:, num_cls_tokens:]
    attn = attn / attn.sum(-1, keepdims=True)
    num_patches = attn.shape[-1]
    length = int(np.sqrt(num_patches))
    d = nb_distance_matrix(patch_size, num_patches, length).reshape(1, 1, num_patches, num_patches)
    return np.mean(np.sum(attn * d, axis=-1), axis=-1)


def nb_nmi(attn: np.ndarray, num_cls_tokens: int = 1, eps: float = 1e-32) -> np.ndarray:
    attn = attn[..., num_cls_tokens:, num_cls_tokens:]
    attn = attn / attn.sum(-1, keepdims=True)
    n = attn.shape[-1]
    p_q = np.full(n, 1.0 / n)
    p_k = np.einsum("q,bhqk->bhk", p_q, attn)
    joint = attn * p_q[None, None, :, None]
    mi = np.sum(joint * np.log(attn / (p_k[:, :, None, :] + eps) + eps), axis=(-1, -2))
    h_q = -np.sum(p_q * np.log(p_q + eps))
    h_k = -np.sum(p_k * np.log(p_k + eps), axis=-1)
    return mi / np.sqrt(h_q * h_k)


def nb_fourier_map(latent: np.ndarray, num_cls_tokens: int = 1) -> np.ndarray:
    """Batch- and channel-mean of the shifted log amplitude (the notebook before the diagonal)."""
    latent = latent[:, num_cls_tokens:]
    b, n, c = latent.shape
    h = int(math.sqrt(n))
    latent = latent.reshape(b, h, h, c).transpose(0, 3, 1, 2)
    f = np.log(np.abs(np.fft.fft2(latent)) + 1e-6)
    return np.roll(f, shift=(int(h / 2), int(h / 2)), axis=(2, 3)).mean(axis=(0, 1))


def nb_fourier_curve(mean_map: np.ndarray) -> np.ndarray:
    h = mean_map.shape[0]
    d = np.diag(mean_map)[int(h / 2):]
    return d - d[0]


def nb_hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    n = k.shape[0]
    ones = np.ones(n)
    return (np.trace(k @ l) + ones @ k @ ones * (ones @ l @ ones) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * ones @ k @ l @ ones) / (n * (n - 3))


def nb_cka_update(hsic: np.ndarray, feats: list[np.ndarray]) -> None:
    grams = [f @ f.T for f in feats]
    for i in range(len(grams)):
        for j in range(len(grams)):
            hsic[i, j] += nb_hsic_unbiased(grams[i], grams[j])


# ---- part 1 ----------------------------------------------------------------------------------------------

class Ours:
    """The :mod:`analysis` accumulators."""

    def __init__(self, batch: int, attn_layers: int, token_layers: int) -> None:
        self.dist = [AttentionDistance(GRID, PATCH, PREFIX) for _ in range(attn_layers)]
        self.nmi = [AttentionNMI(PREFIX) for _ in range(attn_layers)]
        self.fourier = FourierAccumulator(GRID, PREFIX, token_layers)
        self.cka = CKAAccumulator(estimator="minibatch", chunk_size=batch)

    def steps(self, attns, tokens, feats):
        return {"distance": lambda: [d.update(a) for d, a in zip(self.dist, attns)],
                "nmi": lambda: [m.update(a) for m, a in zip(self.nmi, attns)],
                "fourier": lambda: self.fourier.update(tokens),
                "cka": lambda: self.cka.update(feats)}

    def compute(self) -> dict[str, np.ndarray]:
        return {"distance": torch.stack([d.compute() for d in self.dist]).numpy(),
                "nmi": torch.stack([m.compute() for m in self.nmi]).numpy(),
                "fourier": self.fourier.compute().numpy(), "cka": self.cka.compute().numpy()}


class Notebook:
    """Notebook-style: per batch, float64 numpy, loop-built distance matrix, loops over CKA pairs."""

    def __init__(self, batch: int, attn_layers: int, token_layers: int) -> None:
        self.dist = [[] for _ in range(attn_layers)]
        self.nmi = [[] for _ in range(attn_layers)]
        self.maps = [[] for _ in range(token_layers)]
        self.hsic = np.zeros((CKA_LAYERS, CKA_LAYERS))

    def steps(self, attns, tokens, feats):
        attns = [a.double().numpy() for a in attns]
        tokens = [t.double().numpy() for t in tokens]
        feats = [f.double().numpy() for f in feats]
        return {"distance": lambda: [d.append(nb_attention_distance(a, PATCH)) for d, a in zip(self.dist, attns)],
                "nmi": lambda: [m.append(nb_nmi(a)) for m, a in zip(self.nmi, attns)],
                "fourier": lambda: [m.append(nb_fourier_map(t)) for m, t in zip(self.maps, tokens)],
                "cka": lambda: nb_cka_update(self.hsic, feats)}

    def compute(self) -> dict[str, np.ndarray]:
        return {"distance": np.stack([np.concatenate(d).mean(0) for d in self.dist]),
                "nmi": np.stack([np.concatenate(m).mean(0) for m in self.nmi]),
                "fourier": np.stack([nb_fourier_curve(np.mean(m, axis=0)) for m in self.maps]),
                "cka": self.hsic / np.sqrt(np.outer(np.diag(self.hsic), np.diag(self.hsic)))}


class Floors:
    """Lower bounds on the time of any exact implementation in eager PyTorch, for ``reference / floor``:

    * NMI: one ``torch.log`` per attention entry and nothing else (NMI needs one logarithm per entry);
    * CKA: the float32 Gram matrices of the layers (one batched matmul per batch, the only
      O(n^2 d) work of minibatch CKA) and nothing else.
    """

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None  # reused: a fresh 25 MB output would time page faults, not logs

    def steps(self, attns, tokens, feats):
        if self.out is None or self.out.shape != attns[0].shape:
            self.out = torch.empty_like(attns[0])
        z = torch.stack(feats)  # untimed, like the notebook side's conversions
        return {"nmi": lambda: [torch.log(a, out=self.out) for a in attns],
                "cka": lambda: torch.bmm(z, z.transpose(1, 2))}

    def compute(self) -> dict:
        return {}


def run(impls: dict, images: int, batch: int, attn_layers: int, token_layers: int) -> dict:
    """Stream the synthetic batches through every implementation, interleaved metric by metric and
    batch by batch so that all of them see the same machine load (the order alternates between
    batches, so neither side always runs on a cache warmed by the other).

    Returns {name: (results, wall seconds per metric, CPU seconds per metric, per-batch wall seconds
    per metric)}. CPU time (this thread's) leaves out the time other processes hold the cores, so
    its ratio is the steadier one on a shared machine; both are single-threaded at ``--threads 1``.
    """
    wall = {name: {} for name in impls}
    cpu = {name: {} for name in impls}
    per_batch = {name: {} for name in impls}
    names = list(impls)
    for index in range(images // batch):
        attns, tokens, feats = synthetic_batch(index, batch, attn_layers, token_layers)
        steps = {name: impl.steps(attns, tokens, feats) for name, impl in impls.items()}  # input conversion: untimed
        order = names if index % 2 == 0 else names[::-1]
        for metric in steps[names[0]]:
            for name in order:
                if metric not in steps[name]:
                    continue
                t0, c0 = time.perf_counter(), time.thread_time()
                steps[name][metric]()
                dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                wall[name][metric] = wall[name].get(metric, 0.0) + dt
                cpu[name][metric] = cpu[name].get(metric, 0.0) + dc
                per_batch[name].setdefault(metric, []).append(dt)
    out = {}
    for name, impl in impls.items():
        t0, c0 = time.perf_counter(), time.thread_time()
        results = impl.compute()
        if "cka" in wall[name]:
            wall[name]["cka"] += time.perf_counter() - t0  # the only non-trivial finalisation
            cpu[name]["cka"] += time.thread_time() - c0
        out[name] = (results, wall[name], cpu[name], per_batch[name])
    return out


def run_ours(images: int, batch: int, attn_layers: int, token_layers: int) -> dict[str, np.ndarray]:
    """Ours alone (the memory measurement)."""
    return run({"ours": Ours(batch, attn_layers, token_layers)}, images, batch, attn_layers, token_layers)["ours"][0]


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def streaming_peak_mib(images: int, batch: int, attn_layers: int, token_layers: int) -> tuple[float, float]:
    """(RSS before, peak RSS while) streaming ours over ``images`` images, in this process, MiB.

    The kernel's high-water mark is reset first (``/proc/self/clear_refs``), so the import spike of
    torch/timm/sklearn does not hide the streaming part (Linux only).
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mib("VmRSS")
    run_ours(images, batch, attn_layers, token_layers)
    return before, _status_mib("VmHWM")


# glibc's malloc raises its mmap threshold to the size of the largest block freed (up to 32 MiB), after
# which the 25 MB batch tensors come from the heap and freed ones are not always returned: RSS then
# drifts up over the first batches whatever the code keeps alive. A fixed threshold makes RSS track
# the memory actually in use (and lowers the peak); both settings are reported.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def peak_rss_mib(images: int, batch: int, attn_layers: int, token_layers: int, threads: int,
                 env: dict[str, str] | None = None) -> tuple[float, float]:
    """:func:`streaming_peak_mib` in a fresh process (so earlier allocations do not count); ``env``: extra
    environment variables for that process."""
    code = ("import sys, torch; sys.path.insert(0, 'bench'); torch.set_num_threads(%d);"
            "import bench_analysis as b; print(*b.streaming_peak_mib(%d, %d, %d, %d))") % (
                threads, images, batch, attn_layers, token_layers)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    before, peak = (float(v) for v in out.stdout.strip().splitlines()[-1].split())
    return before, peak


def write_photo_crops(root: str, images: int, size: int = 128, classes: int = 4, seed: int = 0) -> str:
    """``images`` random square crops of the offline demo photographs as PNG files in ``classes``
    class folders under ``root`` (the input of the pipeline memory measurement)."""
    from PIL import Image

    from kamim.data.demo import demo_photographs

    photos = [p if p.ndim == 3 else np.repeat(p[..., None], 3, -1) for p in demo_photographs().values()]
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"c{c}"), exist_ok=True)
    for i in range(images):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        Image.fromarray(np.ascontiguousarray(img[y:y + side, x:x + side])).resize((size, size)).save(
            os.path.join(root, f"c{i % classes}", f"{i:05d}.png"))
    return root


def pipeline_peak_rss_mib(images: int, folder: str, out: str, threads: int) -> tuple[float, float, float]:
    """(RSS before, peak RSS, seconds) of ``kamim-analyze run`` (every analysis but attribution) over
    ``images`` images of ``folder``, randomly initialised ViT-S/16 at 96 px, batch 25, in a fresh
    process with glibc's default malloc, the high-water mark reset after the imports."""
    analyses = "attention-distance,nmi,attention-entropy,attention-similarity,cka,fourier,tsne,pre-post,attention-maps,rollout"
    argv = ["run", "--model", "vit=vit_small_patch16_224", "--image-size", "96", "--data", folder, "--out", out,
            "--images", str(images), "--batch-size", "25", "--analyses", analyses, "--quiet"]
    code = ("import sys, time, torch; torch.set_num_threads(%d); sys.path.insert(0, 'bench');"
            "import bench_analysis as b; from analysis import cli;"
            "open('/proc/self/clear_refs', 'w').write('5'); before = b._status_mib('VmRSS'); t0 = time.time();"
            "rc = cli.main(%r); assert rc == 0, rc;"
            "print(before, b._status_mib('VmHWM'), time.time() - t0)") % (threads, argv)
    out_ = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    before, peak, seconds = (float(v) for v in out_.stdout.strip().splitlines()[-1].split())
    return before, peak, seconds


# ---- part 3 ----------------------------------------------------------------------------------------------

def photo_loader(images: int, batch: int, size: int, seed: int = 0):
    """Random resized crops of real photographs, ImageNet-normalised, labelled by photograph."""
    from sklearn.datasets import load_sample_images
    from skimage import data
    from torchvision.transforms import v2

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), *load_sample_images().images]
    photos = [torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in photos]  # copy: some are read-only
    transform = v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    torch.manual_seed(seed)
    batches = []
    for start in range(0, images, batch):
        idx = [(start + i) % len(photos) for i in range(min(batch, images - start))]
        batches.append({"image": torch.stack([transform(photos[i]) for i in idx]), "label": torch.tensor(idx)})
    return batches


def run_suite(images: int, batch: int, threads: int) -> None:
    import timm

    from analysis.runner import ANALYSES, run_analyses

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=192, num_classes=6).eval()
    loader = photo_loader(images, batch, 192)
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in loader:
            model(b["image"])
    forward = time.perf_counter() - t0
    cheap = [a for a in ANALYSES if a != "attribution"]
    t0 = time.perf_counter()
    result = run_analyses(model, loader, cheap, model_name="vit_small/192 (random init)", progress=False,
                          batch_size=batch, tsne_threads=threads)
    suite = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_analyses(model, loader[:1], ["attribution"], model_name="attr", progress=False, map_images=4,
                 attribution_steps=32, attribution_internal_batch_size=16)
    attribution = time.perf_counter() - t0
    print(f"\n[suite] {images} real-photo crops, 192 px, vit_small_patch16_224 (random init), batch {batch}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"  plain forward pass (fused attention): {forward:7.1f} s")
    print(f"  run_analyses, {len(cheap)} analyses:      {suite:7.1f} s  ({', '.join(cheap)})")
    print(f"  attribution (IG 32 steps + occlusion) on 4 images: {attribution:.1f} s")
    d = result.metric("attention-distance")
    print("  mean attention distance (px) per layer:",
          " ".join(f"{v:.1f}" for v in d[d["head"] == -1].sort_values("layer")["value"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--attn-layers", type=int, default=2, help="attention layers timed (cost is per layer)")
    parser.add_argument("--token-layers", type=int, default=2, help="token maps for the Fourier analysis")
    parser.add_argument("--pipeline-images", type=int, default=1000,
                        help="peak memory of kamim-analyze run over 100 vs this many images (0: skip)")
    parser.add_argument("--suite-images", type=int, default=200)
    parser.add_argument("--suite-batch", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads and numpy BLAS threads")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads for ours only (default: --threads); numpy's BLAS keeps --threads. "
                             "numpy's elementwise ops and FFT use one core whatever is set, so this measures "
                             "what ours gains from the other cores of the machine")
    args = parser.parse_args()
    if args.images % args.batch:
        parser.error(f"--images ({args.images}) must be a multiple of --batch ({args.batch})")
    torch.set_num_threads(args.torch_threads or args.threads)

    print(f"[metrics] {args.images} synthetic 192 px images (12x12 tokens + CLS, {HEADS} heads, width {WIDTH}), "
          f"batch {args.batch}, {args.attn_layers} attention layers, {args.token_layers} token layers, "
          f"{CKA_LAYERS} CKA layers; threads: torch {torch.get_num_threads()}, numpy BLAS {args.threads} "
          f"(numpy elementwise and FFT are single-threaded); both sides get the same float32 data "
          f"(the notebook side as float64 numpy copies, converted untimed)")
    load_before = os.getloadavg()
    with threadpool_limits(limits=args.threads, user_api="blas"):  # numpy's BLAS (CKA reference)
        timings = run({"ours": Ours(args.batch, args.attn_layers, args.token_layers),
                       "notebook": Notebook(args.batch, args.attn_layers, args.token_layers),
                       "floor": Floors()},
                      args.images, args.batch, args.attn_layers, args.token_layers)
    load_after = os.getloadavg()
    (ours, t_ours, c_ours, b_ours), (ref, t_ref, c_ref, b_ref) = timings["ours"], timings["notebook"]
    tolerances = {"distance": dict(rtol=1e-5), "nmi": dict(rtol=1e-4, atol=1e-6), "fourier": dict(atol=1e-4),
                  "cka": dict(rtol=1e-6, atol=1e-7)}
    for key, tol in tolerances.items():
        np.testing.assert_allclose(ours[key], ref[key], **tol, err_msg=key)
        err = np.abs(ours[key] - ref[key]).max()
        per_batch = np.median(np.array(b_ref[key]) / np.array(b_ours[key]))
        print(f"  {key:9s} ours {t_ours[key]:6.2f} s   notebook-style {t_ref[key]:6.2f} s   x{t_ref[key] / t_ours[key]:5.1f} "
              f"(median per batch x{per_batch:5.1f}; CPU time {c_ours[key]:6.2f} s vs {c_ref[key]:6.2f} s "
              f"x{c_ref[key] / c_ours[key]:5.1f})   identical (max |diff| {err:.1e})")
    floor = timings["floor"]
    for key, what in (("nmi", "one torch.log per attention entry"), ("cka", "the float32 Gram matrices (one bmm)")):
        print(f"  {key} floor: {what}, nothing else: {floor[1][key]:.2f} s (CPU {floor[2][key]:.2f} s): best possible "
              f"{key} ratio x{t_ref[key] / floor[1][key]:.1f} (CPU x{c_ref[key] / floor[2][key]:.1f}); "
              f"ours is {t_ours[key] / floor[1][key]:.1f}x the floor")
    print(f"  e.g. layer-1 attention distance per head (px): {np.round(ours['distance'][0], 2).tolist()}")
    print(f"  load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} CPUs")

    print("\n[memory] peak RSS while streaming ours (fresh process, after imports)")
    for label, env in (("default glibc malloc", None), ("MALLOC_MMAP_THRESHOLD_=1 MiB", FIXED_MMAP_THRESHOLD)):
        base_s, small = peak_rss_mib(100, args.batch, args.attn_layers, args.token_layers, args.threads, env)
        base_l, large = peak_rss_mib(args.images, args.batch, args.attn_layers, args.token_layers, args.threads, env)
        print(f"  {label:29s} 100 images {small:.0f} MiB, {args.images} images {large:.0f} MiB "
              f"({100 * (large / small - 1):+.1f}%); RSS before streaming {base_s:.0f} / {base_l:.0f} MiB")

    if args.pipeline_images:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_photo_crops(os.path.join(tmp, "data"), args.pipeline_images)
            print("\n[memory] peak RSS of kamim-analyze run (10 analyses, ViT-S/16 at 96 px, real-photo crops, "
                  "glibc default malloc, fresh process, after imports)")
            rows = [(n, *pipeline_peak_rss_mib(n, folder, os.path.join(tmp, f"out{n}"), args.threads))
                    for n in (100, args.pipeline_images)]
            for n, before, peak, seconds in rows:
                print(f"  {n:5d} images: peak {peak:.0f} MiB (RSS before {before:.0f} MiB), {seconds:.0f} s")
            print(f"  {args.pipeline_images} vs 100 images: {100 * (rows[1][2] / rows[0][2] - 1):+.1f}%")

    if args.suite_images:
        run_suite(args.suite_images, args.suite_batch, args.threads)

    total_ours, total_ref = sum(t_ours.values()), sum(t_ref.values())
    cpu_ours, cpu_ref = sum(c_ours.values()), sum(c_ref.values())
    ratios = ", ".join(f"{key} x{t_ref[key] / t_ours[key]:.1f}" for key in tolerances)
    print(f"\ntime ratio notebook-style / ours (distance+NMI+Fourier+CKA, {args.images} images, torch {torch.get_num_threads()} / numpy BLAS {args.threads} thread(s)): "
          f"wall {total_ref:.1f} s / {total_ours:.1f} s = x{total_ref / total_ours:.1f} ({ratios}); "
          f"CPU {cpu_ref:.1f} s / {cpu_ours:.1f} s = x{cpu_ref / cpu_ours:.1f}")


if __name__ == "__main__":
    main()
