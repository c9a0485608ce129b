"""The workbench's TopK trainer against SAELens and EleutherAI sparsify: one data file, one run each, one table.

Every row trains the same TopK SAE (d_in=576, d_sae=2304, k=32, batch 4096, fp32, Adam, the same peak LR and LR
warm-up, the same number of steps, init seed 0) through that library's own training API, on the same planted-dictionary
activations (training/synthetic.py) read from one safetensors file in the same order, each in its own process and
venv:

- `saewb`: exactly what `saewb train` builds (training/run.py `build_job_sae` with TrainConfig defaults: dataset-scalar
  input normalisation, b_dec at the geometric median of the first 4096 tokens) trained by `training.trainer.train_sae`
  with LoopConfig defaults except `lr` and `warmup_steps`. Its TopK training path is whatever saes/topk.py makes the
  default when the benchmark runs (reported as `kernel`). `saewb-dense` (not run unless asked) forces the dense path.
- `plain`: a textbook PyTorch loop (the `plain` step of bench/train_throughput.py: encoder matmul, topk, scatter to
  dense codes, dense decode, summed MSE, Adam; no decoder normalisation, no AuxK, no clipping), same LR and warm-up.
- `saelens`: sae-lens's `SAETrainer.fit` on an activation iterator (its supported path for given activations, as
  `sae_lens.synthetic.training.train_toy_sae` uses it) with `TopKTrainingSAE` at its config defaults plus k.
- `sparsify`: sparsify's own `Trainer.fit` (optimizer="adam"), its only training API. It is tied to a Hugging Face
  model, so a stand-in "model" whose single layer returns the file's rows for the token ids it is given plays the LM:
  sparsify's forward hook, b_dec init, loss, gradient projection, Adam and LR schedule run unchanged.

Per row: tokens/s (median of `--repeats` consecutive windows of a fixed number of steps after `--timing-warmup`
steps, timed at the library's requests for batches, so its whole loop is counted), held-out FVU, L0 and dead %
(never fired on the held-out tokens), planted recovery (mean over planted directions of the best |cos| with any
decoder row, and the fraction above 0.9), peak RSS of the trainer's process (getrusage of the child), and ratios to
sparsify. Quality comes from one shared evaluation of the weights each trainer saves (TopK inference rule, raw
activation space), checked against each library's own reconstruction.

The rows run at the same time but compute one at a time, in turns of `--turn-steps` steps (20) round the rows: on a
shared machine whose speed drifts over minutes, rows run one after the other would each meet a different machine,
and their ratio would carry that drift. Each worker leaves the time it waits for its turn out of its timestamps. An
idle check brackets the rows: load average, the GFLOP/s of a short fp32 matmul, and the CPU time other processes used
meanwhile. `--turn-steps 0` runs the rows one after the other instead, each with its own idle check.

    python -m bench.peers                          # 3M tokens, 3 windows: about 1.5 hours on 2 idle cores
    python -m bench.peers --tokens 400000          # a quick end-to-end check
    python -m bench.peers --rows saewb,sparsify --tokens 1000000
    python -m bench.peers --reuse                  # after an interruption: finished rows are not trained again

This file is also the worker each trainer process runs (`python bench/peers.py --worker SPEC`); that part imports
only the standard library and torch, so it runs in the peers' venvs.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.utils.data

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SAEWB_CACHE", Path.home() / ".cache" / "saewb"))
VENVS = {"saelens": CACHE / "saelens-venv", "sparsify": CACHE / "sparsify-venv"}
READY = "saewb-ready"  # the marker tests/saes/test_saelens_compat.py writes once a venv is fully installed
ROWS = ("saewb", "plain", "saelens", "sparsify")
OPTIONAL_ROWS = ("saewb-dense",)
HEADER_BYTES = 1 << 14  # reserved for the safetensors header, written last (it holds the data's statistics)
DATA_VERSION = 1


# ---- the data file: a safetensors file every process reads with plain reads (no mmap, so no RSS) -------------
class DataFile:
    """Rows of the tensors of a safetensors file (F32, 2-D), read with pread into fresh buffers."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        self.header = json.loads(os.pread(self.fd, n, 8))
        self.base = 8 + n
        self.meta = {key: json.loads(value) for key, value in self.header.get("__metadata__", {}).items()}

    def shape(self, name: str) -> list[int]:
        return self.header[name]["shape"]

    def rows(self, name: str, start: int, count: int) -> torch.Tensor:
        info = self.header[name]
        n_rows, d = info["shape"]
        if info["dtype"] != "F32" or start < 0 or start + count > n_rows:
            raise ValueError(f"{self.path}: rows {start}:{start + count} of {name} {info['shape']} {info['dtype']}.")
        buffer = bytearray(count * d * 4)
        offset = self.base + info["data_offsets"][0] + start * d * 4
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{self.path}: short read at byte {offset + done}.")
            done += got
        return torch.frombuffer(buffer, dtype=torch.float32).view(count, d)

    def all(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self.shape(name)[0])


# ---- turns: rows that run at the same time compute one at a time, in turns of a few steps --------------------------
TURNS_ENV = "SAEWB_PEERS_TURNS"  # "steps,read_fd,write_fd" in a worker the driver runs interleaved


class Turns:
    """A worker's side of interleaved rows. At its first step and then every `steps` steps it tells the driver
    (b"y") and waits until the driver gives it the turn again (b"g"); the time spent waiting is taken out of the
    clock it reports, so each row's timestamps count only its own computing. The driver hands the turn round the
    rows, so load that comes and goes on a shared machine falls on every row alike. Without pipes (`fds` None)
    the clock is the plain one and nothing waits."""

    def __init__(self, steps: int = 0, fds: tuple[int, int] | None = None, clock=time.perf_counter):
        self.steps, self.fds, self.clock, self.calls, self.waited = steps, fds, clock, 0, 0.0

    @classmethod
    def from_env(cls) -> "Turns":
        value = os.environ.get(TURNS_ENV)
        if not value:
            return cls()
        steps, read_fd, write_fd = (int(part) for part in value.split(","))
        return cls(steps, (read_fd, write_fd))

    def step_start(self) -> float:
        """Called when the library asks for the next batch: waits for the turn if one ends here; returns the time
        on the clock without the waits."""
        if self.fds is not None and (self.calls == 0 or self.calls % self.steps == 0):
            read_fd, write_fd = self.fds
            before = self.clock()
            os.write(write_fd, b"y")
            if os.read(read_fd, 1) != b"g":
                raise SystemExit("bench.peers worker: the driver went away (no turn given); stopping.")
            self.waited += self.clock() - before
        self.calls += 1
        return self.clock() - self.waited


class Batches:
    """The training batches in file order; records when each is requested (that is when a library starts a step),
    on the clock of `turns` (time waiting for other rows' turns left out)."""

    def __init__(self, data: DataFile, batch: int, steps: int, turns: Turns | None = None):
        self.data, self.batch, self.steps, self.i, self.times, self.cpu_times = data, batch, steps, 0, [], []
        self.turns = turns or Turns()

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.i >= self.steps:
            raise StopIteration
        self.times.append(self.turns.step_start())
        self.cpu_times.append(time.process_time())
        x = self.data.rows("train", self.i * self.batch, self.batch)
        self.i += 1
        return x


def data_settings(args) -> dict:
    return {"version": DATA_VERSION, "d": args.d, "n_true": args.n_true, "mean_active": args.mean_active,
            "zipf_exponent": 1.0, "n_pairs": 8, "noise": 0.01, "dictionary_seed": args.seed,
            "train_stream_seed": args.seed + 1, "heldout_seed": args.seed + 2, "batch": args.batch,
            "train_tokens": args.steps * args.batch, "heldout_tokens": args.heldout}


def write_data(path: Path, settings: dict, progress: bool = True) -> None:
    """Generate the planted dictionary, the held-out tokens and the training stream (batch i of
    `PlantedDictionary.batches(batch, seed)` is training rows [i*batch, (i+1)*batch)) into one safetensors file."""
    from training.caching import CacheConfig
    from training.synthetic import make_planted

    planted = make_planted(d=settings["d"], n_true=settings["n_true"], mean_active=settings["mean_active"],
                           zipf_exponent=settings["zipf_exponent"], n_pairs=settings["n_pairs"],
                           noise=settings["noise"], seed=settings["dictionary_seed"])
    d, batch = settings["d"], settings["batch"]
    steps = settings["train_tokens"] // batch
    heldout = planted.sample(settings["heldout_tokens"], torch.Generator().manual_seed(settings["heldout_seed"]))
    shapes = {"directions": [settings["n_true"], d], "heldout": [settings["heldout_tokens"], d],
              "train": [settings["train_tokens"], d]}
    offsets, at = {}, 0
    for name, shape in shapes.items():
        offsets[name] = [at, at + shape[0] * shape[1] * 4]
        at = offsets[name][1]
    tmp = path.with_suffix(".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    norms = torch.empty(settings["train_tokens"])
    started = time.perf_counter()
    with open(tmp, "wb") as handle:
        handle.write(b"\0" * (8 + HEADER_BYTES))
        handle.write(planted.directions.contiguous().numpy().tobytes())
        handle.write(heldout.contiguous().numpy().tobytes())
        for i, x in zip(range(steps), planted.batches(batch, seed=settings["train_stream_seed"])):
            handle.write(x.contiguous().numpy().tobytes())
            norms[i * batch:(i + 1) * batch] = x.norm(dim=-1)
            if progress and (i + 1) % max(steps // 10, 1) == 0:
                print(f"  data: {i + 1}/{steps} batches, {time.perf_counter() - started:.0f} s", flush=True)
        # the dataset scalar as training/caching.py computes it (no special tokens here; same outlier filter)
        outlier_factor = CacheConfig().outlier_factor
        kept = norms[norms <= outlier_factor * norms.median()] if outlier_factor > 0 else norms
        meta = settings | {"dataset_scalar": math.sqrt(d) / kept.mean().item(), "mean_norm": kept.mean().item(),
                           "probs_sum": planted.probs.sum().item(), "generator": "training.synthetic.make_planted"}
        header = {name: {"dtype": "F32", "shape": shape, "data_offsets": offsets[name]}
                  for name, shape in shapes.items()}
        header["__metadata__"] = {key: json.dumps(value) for key, value in meta.items()}
        text = json.dumps(header).encode()
        if len(text) > HEADER_BYTES:
            raise ValueError("safetensors header too long")
        handle.seek(0)
        handle.write(struct.pack("<Q", HEADER_BYTES) + text + b" " * (HEADER_BYTES - len(text)))
    os.replace(tmp, path)


def ensure_data(args) -> Path:
    """The data file for these settings, generated once and reused (keyed by the settings)."""
    settings = data_settings(args)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(args.work_dir) / f"data-{key}.safetensors"
    if path.is_file():
        try:
            if {k: v for k, v in DataFile(path).meta.items() if k in settings} == settings:
                return path
        except (OSError, ValueError, KeyError):
            pass
    print(f"generating {settings['train_tokens']:,} training + {settings['heldout_tokens']:,} held-out tokens "
          f"-> {path}", flush=True)
    write_data(path, settings, progress=not args.quiet)
    return path


# ---- workers: one per trainer process -------------------------------------------------------------------------
def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident set (VmRSS) or its high-water mark (VmHWM) in MiB. VmHWM belongs to the address space
    that exec created, unlike getrusage's ru_maxrss, which Linux carries over from the forking parent across exec."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def lr_warmup_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def work_saewb(spec: dict, data: DataFile, batches: Batches) -> dict:
    from training.caching import CacheConfig
    from training.run import TrainConfig, build_job_sae
    from training.trainer import LoopConfig, train_sae

    d, n = spec["d"], spec["n"]
    if n % d:
        raise ValueError(f"saewb train sets d_sae = expansion x d_in: n={n} must be a multiple of d={d}.")
    # the hook only names the SAE (cfg.json hook_name); given explicitly since CacheConfig may leave it to the model
    cfg = TrainConfig(cache=CacheConfig(hooks=["synthetic.planted"]), k=[spec["k"]], expansion=n // d,
                      batch_size=spec["batch"], seed=spec["seed"],
                      loop=LoopConfig(lr=spec["lr"], warmup_steps=spec["lr_warmup"]),
                      sae_options=dict(spec.get("sae_options", {})))
    sae = build_job_sae(cfg, cfg.specs()[0], d, data.meta["dataset_scalar"], {"source": "bench.peers"})
    sae.init_b_dec(data.rows("train", 0, min(4096, spec["steps"] * spec["batch"])))
    rss_setup = rss_mib()
    history = train_sae(sae, batches, spec["steps"], cfg.loop, progress=False)
    end, peak = time.perf_counter(), rss_mib("VmHWM")
    x_check = data.rows("heldout", 0, spec["n_check"])
    with torch.no_grad():
        own = sae.reconstruct(x_check)
        exported = sae.export_inference()
    return {"end": end, "peak_rss_training_mib": peak, "rss_setup_mib": rss_setup, "weights": {
        "W_enc": exported.W_enc, "b_enc": exported.b_enc, "W_dec": exported.W_dec, "b_dec": exported.b_dec},
        "pre_bias": True, "own_recon": own,
        "library": "saewb", "version": git_describe(),
        "details": {"kernel": sae.cfg.kernel, "fast_path": sae.fast_path, "architecture": sae.architecture,
                    "input_scale": float(data.meta["dataset_scalar"]), "sae_cfg": json_safe(sae.cfg.to_dict()),
                    "loop": json_safe(dataclasses.asdict(cfg.loop)), "input_norm": cfg.input_norm,
                    "b_dec_init": "geometric median of the first 4096 training tokens (as training/run.py)",
                    "final_train_fvu": history[-1]["fvu"]}}


def work_plain(spec: dict, data: DataFile, batches: Batches) -> dict:
    d, n, k = spec["d"], spec["n"], spec["k"]
    generator = torch.Generator().manual_seed(spec["seed"])
    W_enc = torch.nn.Parameter(torch.randn(n, d, generator=generator) / d**0.5)
    W_dec = torch.nn.Parameter(W_enc.detach().clone())
    b_enc = torch.nn.Parameter(torch.zeros(n))
    b_dec = torch.nn.Parameter(torch.zeros(d))
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=spec["lr"])
    rss_setup = rss_mib()
    for step, x in enumerate(batches):  # the `plain` step of bench/train_throughput.py, with an LR warm-up
        for group in opt.param_groups:
            group["lr"] = spec["lr"] * lr_warmup_factor(step, spec["lr_warmup"])
        pre = (x - b_dec) @ W_enc.T + b_enc
        values, indices = pre.topk(k, dim=-1)
        codes = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        loss = ((codes @ W_dec + b_dec - x) ** 2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    end, peak = time.perf_counter(), rss_mib("VmHWM")
    weights = {"W_enc": W_enc.detach(), "b_enc": b_enc.detach(), "W_dec": W_dec.detach(), "b_dec": b_dec.detach()}
    x_check = data.rows("heldout", 0, spec["n_check"])
    return {"end": end, "peak_rss_training_mib": peak, "rss_setup_mib": rss_setup, "weights": weights, "pre_bias": True,
            "own_recon": shared_topk_forward(weights, True, k, x_check), "library": "torch",
            "version": torch.__version__,
            "details": {"init": "W_enc ~ N(0, 1/d), W_dec = W_enc, zero biases (as bench/train_throughput.py)",
                        "lr_schedule": "linear warm-up then constant", "loss": "sum over d of squared error, mean"}}


def work_saelens(spec: dict, data: DataFile, batches: Batches) -> dict:
    import sae_lens
    from sae_lens import SAE, LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(spec["seed"])
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=spec["d"], d_sae=spec["n"], k=spec["k"], dtype="float32",
                                                device="cpu"))
    # As sae_lens/synthetic/training.py `train_toy_sae` sets up SAETrainer for given activations, with our LR and
    # warm-up; everything else (dead_feature_window, feature_sampling_window, clipping) at SAETrainerConfig defaults.
    trainer_cfg = SAETrainerConfig(
        total_training_samples=spec["steps"] * spec["batch"], train_batch_size_samples=spec["batch"],
        lr=spec["lr"], lr_end=spec["lr"], lr_scheduler_name="constant", lr_warm_up_steps=spec["lr_warmup"],
        lr_decay_steps=0, adam_beta1=0.9, adam_beta2=0.999, device="cpu", autocast=False, n_checkpoints=0,
        checkpoint_path=None, save_final_checkpoint=False, logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches)
    rss_setup = rss_mib()
    trainer.fit()
    end, peak = time.perf_counter(), rss_mib("VmHWM")
    folder = Path(spec["out_dir"]) / "saelens-inference"
    sae.save_inference_model(str(folder))  # SAELens's own export (folds the decoder norms into the encoder)
    inference = SAE.load_from_disk(str(folder))
    x_check = data.rows("heldout", 0, spec["n_check"])
    with torch.no_grad():
        own = inference.decode(inference.encode(x_check))
    weights = {"W_enc": inference.W_enc.detach().T.contiguous(), "b_enc": inference.b_enc.detach(),
               "W_dec": inference.W_dec.detach(), "b_dec": inference.b_dec.detach()}
    cfg = sae.cfg
    return {"end": end, "peak_rss_training_mib": peak, "rss_setup_mib": rss_setup, "weights": weights,
            "pre_bias": bool(inference.cfg.apply_b_dec_to_input), "own_recon": own, "library": "sae-lens",
            "version": sae_lens.__version__,
            "details": {"sae_class": type(sae).__name__, "inference_class": type(inference).__name__,
                        "sae_cfg": {key: json_safe(getattr(cfg, key)) for key in (
                            "d_in", "d_sae", "k", "aux_loss_coefficient", "rescale_acts_by_decoder_norm",
                            "decoder_init_norm", "apply_b_dec_to_input", "normalize_activations",
                            "use_sparse_activations", "dtype")},
                        "trainer_cfg": {key: json_safe(getattr(trainer_cfg, key)) for key in (
                            "lr", "lr_end", "lr_scheduler_name", "lr_warm_up_steps", "lr_decay_steps", "adam_beta1",
                            "adam_beta2", "dead_feature_window", "feature_sampling_window", "autocast")},
                        "dead_features_at_end": int(trainer.dead_neurons.sum()),
                        "b_dec_init": "zeros (SAELens 6 default)"}}


class StandIn(torch.nn.Module):
    """What sparsify's Trainer needs of a Hugging Face model: `base_model`, `device`, `dummy_inputs` and a forward
    on token ids. Its one layer returns the training rows the ids point at, so sparsify's forward hook sees the file's
    batches in order. The time of each forward call is when sparsify starts a step."""

    def __init__(self, data: DataFile, seq: int):
        super().__init__()
        self.data, self.seq, self.times, self.cpu_times = data, seq, [], []
        self.turns = Turns()  # the worker sets the real one once sparsify's Trainer is built
        self.layers = torch.nn.ModuleList([torch.nn.Identity()])

    @property
    def base_model(self):
        return self

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dummy_inputs(self):
        return {"input_ids": torch.arange(self.seq)[None]}

    def forward(self, input_ids):
        self.times.append(self.turns.step_start())
        self.cpu_times.append(time.process_time())
        start, count = int(input_ids[0, 0]), input_ids.numel()
        if not torch.equal(input_ids.flatten(), torch.arange(start, start + count)):
            raise ValueError("expected consecutive token ids (sparsify's DataLoader does not shuffle)")
        return self.layers[0](self.data.rows("train", start, count).view(*input_ids.shape, -1))


class TokenIds(torch.utils.data.Dataset):
    def __init__(self, n_seqs: int, seq: int):
        self.n_seqs, self.seq = n_seqs, seq

    def __len__(self):
        return self.n_seqs

    def __getitem__(self, i):
        return {"input_ids": torch.arange(i * self.seq, (i + 1) * self.seq)}


def work_sparsify(spec: dict, data: DataFile, batches: Batches) -> dict:
    import sparsify
    from sparsify import SparseCoderConfig, TrainConfig, Trainer

    seq = math.gcd(spec["batch"], 128)
    cfg = TrainConfig(sae=SparseCoderConfig(num_latents=spec["n"], k=spec["k"]), batch_size=spec["batch"] // seq,
                      optimizer="adam", lr=spec["lr"], lr_warmup_steps=spec["lr_warmup"], hookpoints=["layers.0"],
                      init_seeds=[spec["seed"]], log_to_wandb=False, save_every=10**9,
                      save_dir=str(Path(spec["out_dir"]) / "sparsify-checkpoints"), run_name="peers")
    model = StandIn(data, seq)
    trainer = Trainer(cfg, TokenIds(spec["steps"] * spec["batch"] // seq, seq), model)
    model.times.clear()  # Trainer.__init__ ran the dummy inputs through the model to find the width
    model.cpu_times.clear()
    model.turns = batches.turns
    rss_setup = rss_mib()
    trainer.fit()
    end, peak = time.perf_counter(), rss_mib("VmHWM")
    batches.times, batches.cpu_times = model.times, model.cpu_times
    sae = trainer.saes["layers.0"]
    x_check = data.rows("heldout", 0, spec["n_check"])
    with torch.no_grad():
        own = sae(x_check).sae_out
    weights = {"W_enc": sae.encoder.weight.detach(), "b_enc": sae.encoder.bias.detach(), "W_dec": sae.W_dec.detach(),
               "b_dec": sae.b_dec.detach()}
    optimizer = trainer.optimizers[0]
    return {"end": end, "peak_rss_training_mib": peak, "rss_setup_mib": rss_setup, "weights": weights,
            "pre_bias": True, "own_recon": own,
            "library": "eai-sparsify", "version": sparsify.__version__,
            "details": {"optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
                        "lr_schedule": "transformers.get_linear_schedule_with_warmup (warm-up, then linear to 0)",
                        "decoder_impl": sparsify.utils.decoder_impl.__name__,
                        "sae_cfg": json_safe(cfg.sae.to_dict()), "train_cfg": {key: json_safe(getattr(cfg, key))
                            for key in ("batch_size", "optimizer", "lr", "lr_warmup_steps", "auxk_alpha",
                                        "dead_feature_threshold", "k_decay_steps", "loss_fn", "micro_acc_steps")},
                        "tokens_per_sequence": seq, "b_dec_init": "mean of the first batch (sparsify Trainer)"}}


WORKERS = {"saewb": work_saewb, "saewb-dense": work_saewb, "plain": work_plain, "saelens": work_saelens,
           "sparsify": work_sparsify}


def run_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    started = time.perf_counter()
    rss_start = rss_mib()
    data = DataFile(spec["data"])
    batches = Batches(data, spec["batch"], spec["steps"], Turns.from_env())
    out = WORKERS[spec["row"]](spec, data, batches)
    from safetensors.torch import save_file

    out_dir = Path(spec["out_dir"])
    tensors = {key: value.detach().float().contiguous() for key, value in out.pop("weights").items()}
    tensors["own_recon"] = out.pop("own_recon").detach().float().contiguous()
    save_file(tensors, str(out_dir / "weights.safetensors"))
    result = out | {"row": spec["row"], "times": batches.times, "cpu_times": batches.cpu_times,
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "python": sys.version.split()[0],
                    "rss_start_mib": rss_start, "peak_rss_end_mib": rss_mib("VmHWM"),
                    "worker_seconds": time.perf_counter() - started}
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))


def json_safe(value):
    return json.loads(json.dumps(value, default=str))


def git_describe() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=False)
        return f"git {head.stdout.strip()}"
    except OSError:
        return "unknown"


# ---- shared evaluation ----------------------------------------------------------------------------------------
def shared_topk_forward(weights: dict, pre_bias: bool, k: int, x: torch.Tensor) -> torch.Tensor:
    """The TopK inference rule every row's weights are evaluated with: u = W_enc (x - b_dec) + b_enc (without the
    b_dec shift when pre_bias is false), codes = ReLU of the k largest u, x_hat = codes W_dec + b_dec."""
    pre = (x - weights["b_dec"] * pre_bias) @ weights["W_enc"].T + weights["b_enc"]
    values, indices = pre.topk(k, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    return codes @ weights["W_dec"] + weights["b_dec"]


@torch.no_grad()
def evaluate_weights(weights: dict, pre_bias: bool, k: int, x: torch.Tensor, directions: torch.Tensor,
                     chunk: int = 4096, threshold: float = 0.9) -> dict:
    """Held-out FVU (pooled: sum ||x - x_hat||^2 / sum ||x - mean||^2), L0, dead % (latents that never fire on x) and
    planted recovery (analysis/eval_synthetic.planted_recovery) of a TopK SAE given as weights
    {W_enc [n, d], b_enc [n], W_dec [n, d], b_dec [d]} in raw activation space."""
    from analysis.eval_synthetic import planted_recovery

    weights = {key: value.float() for key, value in weights.items()}
    n = weights["W_dec"].shape[0]
    fired = torch.zeros(n, dtype=torch.bool)
    sq_err, active = 0.0, 0
    for xc in x.split(chunk):
        pre = (xc - weights["b_dec"] * pre_bias) @ weights["W_enc"].T + weights["b_enc"]
        values, indices = pre.topk(k, dim=-1)
        values = values.relu()
        codes = torch.zeros_like(pre).scatter(-1, indices, values)
        sq_err += (xc - codes @ weights["W_dec"] - weights["b_dec"]).double().pow(2).sum().item()
        fired[indices[values > 0]] = True
        active += int((values > 0).sum())
    total = (x.double() - x.double().mean(0)).pow(2).sum().item()
    recovery = planted_recovery(weights["W_dec"], directions, threshold)
    return {"fvu": sq_err / total, "l0": active / len(x), "dead_pct": 100.0 * (1 - fired.float().mean().item()),
            "mean_best_cosine": recovery["mean_best_cosine"], "frac_recovered": recovery["fraction_recovered"],
            "recovery_threshold": threshold, "eval_tokens": len(x)}


# ---- idle check -----------------------------------------------------------------------------------------------
def cpu_busy_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    steal = fields[7] if len(fields) > 7 else 0
    return (sum(fields[:8]) - idle - steal) / tick, steal / tick


def matmul_gflops(d: int, n: int, seconds: float = 0.4) -> float:
    a, b = torch.randn(1024, d), torch.randn(d, n)
    for _ in range(2):
        a @ b
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        calls += 1
    return 2 * 1024 * d * n * calls / (time.perf_counter() - start) / 1e9


def idle_probe(d: int, n: int) -> dict:
    load = os.getloadavg()
    return {"loadavg": [round(v, 2) for v in load], "matmul_gflops": round(matmul_gflops(d, n), 1)}


# ---- the driver -----------------------------------------------------------------------------------------------
def interpreter(row: str) -> tuple[str | None, str]:
    """The python that runs this row, or None and why not."""
    if row not in VENVS:
        return sys.executable, sys.executable
    venv = VENVS[row]
    python = venv / "bin" / "python"
    if not python.exists():
        return None, f"{venv} does not exist (tests/saes/test_{row}_compat.py builds it)"
    if not (venv / READY).exists():
        module = {"saelens": "sae_lens", "sparsify": "sparsify"}[row]
        probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            return None, f"{venv} is not ready (no {READY} marker and `import {module}` fails)"
    return str(python), str(venv)


def windows(times: list[float], batch: int, warmup: int, repeats: int) -> tuple[int, list[float]]:
    """Steps per window and tokens/s of `repeats` consecutive windows after `warmup` steps (`times`: when each step
    started, wall-clock or the process's CPU time)."""
    steps = len(times)
    width = (steps - 1 - warmup) // repeats
    if width < 1:
        raise ValueError(f"{steps} steps cannot hold {repeats} timed windows after {warmup} warm-up steps: raise "
                         "--tokens or lower --repeats / --timing-warmup.")
    rates = []
    for j in range(repeats):
        a = warmup + j * width
        rates.append(width * batch / (times[a + width] - times[a]))
    return width, rates


def prepare_row(row: str, args, data_path: Path, work: Path) -> dict:
    """What running `row` needs (command, env, out_dir), or its final entry when it is skipped or --reuse finds it."""
    python, where = interpreter(row)
    if python is None:
        return {"report": {"status": "skipped", "reason": where}}
    out_dir = work / row
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {"row": row, "data": str(data_path), "d": args.d, "n": args.n, "k": args.k, "batch": args.batch,
            "steps": args.steps, "lr": args.lr, "lr_warmup": args.lr_warmup, "threads": args.threads,
            "seed": args.seed, "n_check": min(1024, args.heldout), "out_dir": str(out_dir),
            "sae_options": {"kernel": "dense"} if row == "saewb-dense" else {}}
    saved = [out_dir / name for name in ("spec.json", "result.json", "weights.safetensors", "idle.json")]
    if args.reuse and all(path.is_file() for path in saved) and json.loads(saved[0].read_text()) == spec:
        if not args.quiet:
            print(f"[{row}] reusing the finished run in {out_dir} (--reuse)", flush=True)
        report = row_report(row, args, data_path, out_dir, where, json.loads(saved[3].read_text()))
        return {"report": report | {"reused": True}}
    for stale in saved:
        stale.unlink(missing_ok=True)
    saved[0].write_text(json.dumps(spec, indent=1))
    if row in VENVS:
        command = [python, str(REPO / "bench" / "peers.py"), "--worker", str(out_dir / "spec.json")]
    else:
        command = [python, "-m", "bench.peers", "--worker", str(out_dir / "spec.json")]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TQDM_DISABLE="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop(TURNS_ENV, None)
    return {"row": row, "where": where, "out_dir": out_dir, "command": command, "env": env}


class RowProcess:
    """One row's trainer process; with `turn_steps`, connected to the driver by a pipe each way (see Turns)."""

    def __init__(self, prepared: dict, args, turn_steps: int = 0):
        self.row, self.out_dir, self.where = prepared["row"], prepared["out_dir"], prepared["where"]
        env, pass_fds, self.to_worker, self.from_worker = dict(prepared["env"]), (), None, None
        if turn_steps:
            worker_reads, self.to_worker = os.pipe()
            self.from_worker, worker_writes = os.pipe()
            env[TURNS_ENV] = f"{turn_steps},{worker_reads},{worker_writes}"
            pass_fds = (worker_reads, worker_writes)
        if not args.quiet:
            print(f"[{self.row}] {' '.join(prepared['command'])}", flush=True)
        self.log = open(self.out_dir / "log.txt", "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(prepared["command"], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, pass_fds=pass_fds)
        for fd in pass_fds:  # the worker's ends: only the worker may hold them, or its exit would not end the pipe
            os.close(fd)
        self.timer = threading.Timer(args.row_timeout, self.proc.kill) if args.row_timeout else None
        if self.timer:
            self.timer.start()

    def turn_ended(self) -> bool:
        """Wait until the worker yields (True) or exits (False)."""
        return os.read(self.from_worker, 1) == b"y"

    def give_turn(self) -> bool:
        """Let the worker compute until it yields (True) or exits (False)."""
        try:
            os.write(self.to_worker, b"g")
        except BrokenPipeError:
            return False
        return self.turn_ended()

    def wait(self) -> tuple[float, float]:
        """(wall seconds since start, the process's CPU seconds) once it has exited."""
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - self.started
        if self.timer:
            self.timer.cancel()
        for fd in (self.to_worker, self.from_worker):
            if fd is not None:
                os.close(fd)
        self.log.close()
        return wall, usage.ru_utime + usage.ru_stime

    def report(self, args, data_path: Path, idle: dict) -> dict:
        if self.proc.returncode != 0 or not (self.out_dir / "result.json").is_file():
            tail = (self.out_dir / "log.txt").read_text(errors="replace")[-3000:]
            return {"status": "failed", "returncode": self.proc.returncode, "log_tail": tail, "idle": idle}
        (self.out_dir / "idle.json").write_text(json.dumps(idle, indent=1))
        return row_report(self.row, args, data_path, self.out_dir, self.where, idle)


def run_row(prepared: dict, args, data_path: Path) -> dict:
    """One row alone, bracketed by its own idle check."""
    before = idle_probe(args.d, args.n)
    busy0, steal0 = cpu_busy_seconds()
    process = RowProcess(prepared, args)
    wall, child_cpu = process.wait()
    busy1, steal1 = cpu_busy_seconds()
    after = idle_probe(args.d, args.n)
    idle = {"before": before, "after": after, "wall_s": round(wall, 1), "child_cpu_s": round(child_cpu, 1),
            "others_cores": round(max(busy1 - busy0 - child_cpu, 0.0) / wall, 2),
            "steal_cores": round((steal1 - steal0) / wall, 2)}
    return process.report(args, data_path, idle)


def run_rows_in_turns(prepared: list[dict], args, data_path: Path) -> dict[str, dict]:
    """All rows at once, computing one at a time in turns of `args.turn_steps` steps, round the rows until each has
    finished; one idle check brackets them all. Each row sets up (imports, builds its SAE) while the others do,
    before any turn is given, and keeps its last turn through its export."""
    before = idle_probe(args.d, args.n)
    busy0, steal0 = cpu_busy_seconds()
    started = time.perf_counter()
    processes = [RowProcess(p, args, args.turn_steps) for p in prepared]
    active = [process for process in processes if process.turn_ended()]  # each says once it is ready to train
    while active:
        active = [process for process in active if process.give_turn()]
    usage = {process.row: process.wait() for process in processes}
    wall = time.perf_counter() - started
    busy1, steal1 = cpu_busy_seconds()
    after = idle_probe(args.d, args.n)
    children = sum(cpu for _, cpu in usage.values())
    shared = {"before": before, "after": after, "wall_s": round(wall, 1),
              "others_cores": round(max(busy1 - busy0 - children, 0.0) / wall, 2),
              "steal_cores": round((steal1 - steal0) / wall, 2),
              "in_turns_with": [p["row"] for p in prepared], "turn_steps": args.turn_steps}
    return {process.row: process.report(args, data_path, shared | {"child_cpu_s": round(usage[process.row][1], 1)})
            for process in processes}


def row_report(row: str, args, data_path: Path, out_dir: Path, where: str, idle: dict) -> dict:
    """The row's entry from what its worker saved: timings from its result, quality from the shared evaluation."""
    result = json.loads((out_dir / "result.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(str(out_dir / "weights.safetensors"))
    own = tensors.pop("own_recon")
    data = DataFile(data_path)
    x = data.all("heldout")
    metrics = evaluate_weights(tensors, result["pre_bias"], args.k, x, data.all("directions"))
    shared = shared_topk_forward(tensors, result["pre_bias"], args.k, x[:len(own)])
    width, rates = windows(result["times"], args.batch, args.timing_warmup, args.repeats)
    _, cpu_rates = windows(result["cpu_times"], args.batch, args.timing_warmup, args.repeats)
    times = result["times"]
    return {"status": "ok", "library": result["library"], "version": result["version"], "torch": result["torch"],
            "runs": RUNS[row], "python": where,
            "tokens_per_s": round(statistics.median(rates)), "tokens_per_s_windows": [round(r) for r in rates],
            "window_steps": width, "tokens_per_cpu_s": round(statistics.median(cpu_rates)),
            "tokens_per_cpu_s_windows": [round(r) for r in cpu_rates],
            "cpu_share_of_threads": round(statistics.median(r / c for r, c in zip(rates, cpu_rates))
                                          / result["threads"], 2),
            "tokens_per_s_all_steps": round((len(times) - 1) * args.batch / (times[-1] - times[0])),
            "train_steps": len(times), "train_tokens": len(times) * args.batch,
            **{key: round(value, 5) if isinstance(value, float) else value for key, value in metrics.items()},
            "peak_rss_mib": round(result["peak_rss_training_mib"], 1),
            "peak_rss_with_export_mib": round(result["peak_rss_end_mib"], 1),
            "rss_before_training_mib": round(result["rss_setup_mib"], 1),
            "rss_at_start_mib": round(result["rss_start_mib"], 1),
            "own_vs_shared_recon_max_abs_diff": float((own - shared).abs().max()),
            "own_recon_scale": float(own.abs().max()), "threads": result["threads"],
            "worker_seconds": round(result["worker_seconds"], 1), "details": result["details"], "idle": idle}


RUNS = {
    "saewb": ("training.run.build_job_sae(TrainConfig(k=[k], expansion=n/d, seed), ...) with the dataset scalar "
              "sqrt(d)/E||x|| of the training tokens and init_b_dec on the first 4096 tokens, exactly as `saewb "
              "train` builds its SAE; then training.trainer.train_sae(sae, batches, steps, LoopConfig(lr=LR, "
              "warmup_steps=W)) (Trainer: LR warm-up + linear decay over the last 20%, grad clip 1, gradient "
              "projection + decoder renormalisation, dead-latent counter over 10M tokens feeding AuxK/32). The SAE's "
              "default TopK training path is reported under details.kernel."),
    "saewb-dense": "as saewb, with --sae-options kernel dense (the reference dense TopK path).",
    "plain": ("a plain PyTorch loop in this venv: u = (x - b_dec) W_enc^T + b_enc, topk, ReLU, scatter to dense "
              "codes, x_hat = codes W_dec + b_dec, loss = mean over tokens of the summed squared error, Adam; linear "
              "LR warm-up then constant; nothing else (bench/train_throughput.py's plain step)."),
    "saelens": ("sae_lens.SAETrainer(SAETrainerConfig(lr=LR, lr_end=LR, constant schedule, lr_warm_up_steps=W, "
                "Adam (0.9, 0.999), the rest default), TopKTrainingSAE(TopKTrainingSAEConfig(d_in, d_sae, k), "
                "defaults otherwise: AuxK coefficient 1 on latents dead for dead_feature_window=1000 steps, "
                "rescale_acts_by_decoder_norm, decoder_init_norm 0.1, dense codes), data_provider=the file's "
                "batches).fit(), the set-up of sae_lens.synthetic.training.train_toy_sae; exported with "
                "save_inference_model and reloaded with SAE.load_from_disk."),
    "sparsify": ("sparsify.Trainer(TrainConfig(SparseCoderConfig(num_latents=n, k=k), optimizer='adam', lr=LR, "
                 "lr_warmup_steps=W, the rest default: auxk_alpha 0, dead_feature_threshold 10M tokens, fvu loss), "
                 "dataset of consecutive token ids, a stand-in model whose layer returns the file's rows).fit(): "
                 "sparsify's own forward hook (b_dec = mean of the first batch, decoder unit-normalised before each "
                 "forward, fused TopK encoder, embedding_bag decoder, loss fvu), remove_gradient_parallel_to_decoder"
                 "_directions, torch.optim.Adam (bitsandbytes absent), get_linear_schedule_with_warmup."),
}


def add_ratios(rows: dict) -> None:
    ref = rows.get("sparsify", {})
    for row in rows.values():
        if row.get("status") != "ok":
            continue
        if ref.get("status") == "ok":
            row["ratio_to_sparsify"] = {"tokens_per_s": round(row["tokens_per_s"] / ref["tokens_per_s"], 2),
                                        "tokens_per_cpu_s": round(row["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"], 2),
                                        "peak_rss": round(row["peak_rss_mib"] / ref["peak_rss_mib"], 2),
                                        "fvu": round(row["fvu"] / ref["fvu"], 2) if ref["fvu"] > 0 else None}
        else:
            row["ratio_to_sparsify"] = None


def changed_files() -> dict:
    """The commit and which files of the default training path differ from it (another engineer may be editing)."""
    files = ["saes/topk.py", "saes/sparse_topk.py", "saes/base.py", "saes/ops.py", "training/trainer.py",
             "training/run.py"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *files], cwd=REPO, capture_output=True,
                               text=True, check=False).stdout.split("\n")
        return {"commit": head, "uncommitted_changes_in": sorted(line[3:] for line in dirty if line.strip())}
    except OSError:
        return {}


def markdown(report: dict) -> str:
    s = report["settings"]
    idle = report["idle_check"]
    ok = {name: row for name, row in report["rows"].items() if row["status"] == "ok"}
    others = max((row["idle"]["others_cores"] for row in ok.values()), default=0.0)
    lines = [
        "# TopK SAE training: saewb vs SAELens vs sparsify",
        "",
        f"**Token budget: {s['train_tokens']:,} training tokens per row** ({s['steps']} steps x {s['batch']}), "
        f"d_in={s['d']}, d_sae={s['n']}, k={s['k']}, fp32, {s['threads']} threads, Adam lr {s['lr']:.3g}, "
        f"LR warm-up {s['lr_warmup']} steps; timed windows of {next(iter(ok.values()))['window_steps'] if ok else '?'} "
        f"steps after {s['timing']['warmup_steps']}; rows trained here ran {s['timing'].get('rows', 'one after another')}. "
        f"**Load average at start {idle['start']['loadavg']}, at end "
        f"{idle['end']['loadavg']}** on {report['machine'].get('cpu_count')} CPUs "
        f"({report['machine'].get('cpu')}); matmul probe {idle['start']['matmul_gflops']} -> "
        f"{idle['end']['matmul_gflops']} GFLOP/s.",
        "",
    ]
    if others > 0.2:
        lines += [f"**Loaded machine:** other processes used up to {others} of the {report['machine'].get('cpu_count')}"
                  " cores while rows ran (column `others' cores`), so tok/s are not idle-machine numbers and their "
                  "ratios carry that noise; tok/CPU-s (tokens per CPU-second of the trainer process) is less "
                  "sensitive to it. Rerun on an idle machine for the headline numbers.", ""]
    lines += [
        f"Data: planted dictionary of {s['data']['n_true']} unit directions in d={s['d']} (training/synthetic.py, "
        f"~{s['data']['mean_active']} active per token, Zipf firing), one safetensors file read by every trainer in "
        f"the same order; evaluated on {s['data']['heldout_tokens']:,} held-out tokens with one shared TopK "
        "evaluation of the saved weights.",
        "",
        "| row | library | tok/s (median) | windows | tok/CPU-s | FVU | L0 | dead % | mean best cos | frac > 0.9 "
        "| peak RSS MiB (before training) | tok/s ÷ sparsify | tok/CPU-s ÷ sparsify | RSS ÷ sparsify "
        "| load 1-min before → after | others' cores | matmul GFLOP/s before → after |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for name, row in report["rows"].items():
        if row["status"] != "ok":
            why = row.get("reason") or f"returncode {row.get('returncode')}"
            lines.append(f"| {name} | {row['status']}: {why} |" + " |" * 15)
            continue
        ratio = row.get("ratio_to_sparsify") or {}
        i = row["idle"]
        lines.append(
            f"| {name} | {row['library']} {row['version']} | {row['tokens_per_s']:,} | "
            f"{' / '.join(f'{r:,}' for r in row['tokens_per_s_windows'])} | {row['tokens_per_cpu_s']:,} | "
            f"{row['fvu']:.4f} | {row['l0']:.1f} | {row['dead_pct']:.1f} | {row['mean_best_cosine']:.3f} | "
            f"{row['frac_recovered']:.3f} | {row['peak_rss_mib']:,.0f} ({row['rss_before_training_mib']:,.0f}) | "
            f"{ratio.get('tokens_per_s', '-')} | {ratio.get('tokens_per_cpu_s', '-')} | {ratio.get('peak_rss', '-')} | "
            f"{i['before']['loadavg'][0]} → {i['after']['loadavg'][0]} | {i['others_cores']} | "
            f"{i['before']['matmul_gflops']} → {i['after']['matmul_gflops']} |")
    lines += ["", "What each row ran:", ""]
    for name, row in report["rows"].items():
        lines.append(f"- `{name}`: {RUNS.get(name, '')}")
        if row.get("status") == "ok" and name.startswith("saewb"):
            lines.append(f"  Training path this run: kernel=`{row['details']['kernel']}` (fast path "
                         f"{row['details']['fast_path']}), at commit {row['version']} when the row ran; at the end of "
                         f"the run the repository was at {report['code']['commit'][:7]} with uncommitted changes in "
                         f"{', '.join(report['code']['uncommitted_changes_in']) or 'none'}.")
    lines += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]]
    lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


NOTES = [
    "tok/s: median over the timed windows (consecutive runs of `window_steps` steps after the timing warm-up), timed "
    "between the library's requests for batches, so everything its loop does per step counts (bookkeeping, "
    "dead-latent counters, LR schedule); reading a batch from the file (a 9 MiB pread from the page cache) is in "
    "every row alike. `tokens_per_s_all_steps` in the JSON covers all steps. tok/CPU-s: the same windows timed with "
    "the trainer process's CPU time (all its threads): on an idle machine about tok/s / threads; on a loaded one it "
    "moves less than tok/s (OpenMP spin-waiting still inflates it).",
    "Turns (the default, `settings.timing.rows`): the rows trained in this invocation ran at the same time, computing "
    "one at a time in turns of `turn_steps` steps round the rows, each leaving the time it waited out of its "
    "timestamps, so drift in the machine's speed over minutes falls on them alike; a row taken from an earlier run "
    "with --reuse was not in those turns (its `idle.in_turns_with` says which rows were).",
    "Idle check: load average and a 1024 x d x n fp32 matmul rate just before and after the rows (in turns) or each "
    "row (one after another); `others' cores` is the CPU time the rest of the machine used meanwhile (from "
    "/proc/stat, minus the trainers' own), so a loaded machine is visible. The 1-min load average after includes "
    "the rows themselves.",
    "Quality: one shared evaluation of the saved weights (u = W_enc (x - b_dec) + b_enc, ReLU of the top k, "
    "x_hat = codes W_dec + b_dec, raw activation space); `own_vs_shared_recon_max_abs_diff` in the JSON checks it "
    "against each library's own reconstruction. FVU pooled; dead % = never fired on the held-out tokens; recovery = "
    "analysis/eval_synthetic.planted_recovery.",
    "Peak RSS: the trainer process's high-water mark (VmHWM) once training ends (the data file is read with pread, "
    "never mapped, so it does not count; getrusage's ru_maxrss would report the forking driver's RSS instead); it "
    "includes each library's imports (sparsify imports transformers, SAELens transformer-lens): "
    "`rss_before_training_mib` in the JSON is the RSS once the SAE and trainer are built.",
    "Same across rows: data, batch order, steps, peak LR (our default 2e-4/sqrt(d_sae/2^14), which is sparsify's "
    "too), warm-up length, Adam (0.9, 0.999), fp32, threads. Each library's own defaults otherwise: LR after the "
    "warm-up (saewb: linear decay over the last 20%; SAELens: constant; sparsify: linear decay to 0 over the run; "
    "plain: constant), init, b_dec init, input scaling (saewb trains on the dataset-scalar-normalised input, the "
    "others on raw x), clipping (saewb, SAELens: 1; sparsify, plain: none), loss normalisation (sparsify: FVU; "
    "others: summed squared error).",
    "AuxK: no latent reaches a dead threshold in budgets under 10M tokens for saewb and sparsify (10M tokens) or "
    "1000 steps for SAELens, so the aux loss is inactive in every row here (sparsify's default auxk_alpha is 0 "
    "anyway).",
    "Short budgets: over a few hundred steps the quality columns mostly show how fast each library's defaults get "
    "going (init, LR schedule, input scale), not where they converge: SAELens starts from decoder rows of norm 0.1 "
    "and sparsify's LR decays linearly from the end of the warm-up. Compare quality at the default 3M tokens.",
    "Harness check (done once when this script was written): sparsify's Trainer driven through the stand-in model "
    "ends with weights bit-identical to a hand-written loop of sparsify's step (SparseCoder forward -> fvu, "
    "remove_gradient_parallel_to_decoder_directions, torch Adam, get_linear_schedule_with_warmup) after 12 "
    "full-size steps; every row's own reconstruction matches the shared evaluation (JSON).",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3_000_000, help="training tokens per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per row (median reported)")
    parser.add_argument("--timing-warmup", type=int, default=5, help="steps before the first timed window")
    parser.add_argument("--out", type=Path, default=Path("bench/results/peers.json"), help="JSON; the .md beside it")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated, from {', '.join(ROWS + OPTIONAL_ROWS)}")
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--n", type=int, default=2304)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--lr", type=float, help="default: 2e-4 / sqrt(n / 2^14) (saewb's and sparsify's default)")
    parser.add_argument("--lr-warmup", type=int, help="default: min(1000, steps // 10), saewb's capped default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-true", type=int, help="planted directions (default n / 2)")
    parser.add_argument("--mean-active", type=float, help="mean active planted directions per token (default k / 1.5)")
    parser.add_argument("--heldout", type=int, default=65536, help="held-out tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=CACHE / "bench-peers",
                        help="data file (reused across runs with the same settings) and per-row outputs")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a row's finished run from an earlier invocation with the same spec (e.g. after an "
                             "interruption) instead of training it again")
    parser.add_argument("--turn-steps", type=int, default=20,
                        help="run the rows at the same time, computing one at a time in turns of this many steps, so "
                             "a machine's load that comes and goes falls on every row alike (0: one row after the "
                             "other, each with its own idle check)")
    parser.add_argument("--row-timeout", type=float, default=0,
                        help="kill a row's trainer this many seconds after it starts (in turns: after all start)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    args.steps = args.tokens // args.batch
    if args.steps < 2:
        raise SystemExit(f"--tokens {args.tokens} gives {args.steps} steps of {args.batch}: raise it.")
    if args.turn_steps < 0:
        raise SystemExit(f"--turn-steps must be 0 (rows one after another) or a number of steps, not {args.turn_steps}.")
    args.lr = args.lr if args.lr is not None else 2e-4 / math.sqrt(args.n / 2**14)
    args.lr_warmup = args.lr_warmup if args.lr_warmup is not None else max(1, min(1000, args.steps // 10))
    args.n_true = args.n_true or args.n // 2
    args.mean_active = args.mean_active or round(args.k / 1.5, 2)
    args.rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = [row for row in args.rows if row not in WORKERS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {', '.join(ROWS + OPTIONAL_ROWS)}.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return {}
    from bench.machine import describe_machine

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    start_probe = idle_probe(args.d, args.n)
    data_path = ensure_data(args)
    data = DataFile(data_path)
    prepared = {row: prepare_row(row, args, data_path, work) for row in args.rows}
    to_run = [p for p in prepared.values() if "report" not in p]
    if args.turn_steps and len(to_run) > 1:
        ran = run_rows_in_turns(to_run, args, data_path)
    else:
        ran = {p["row"]: run_row(p, args, data_path) for p in to_run}
    rows = {row: p["report"] if "report" in p else ran[row] for row, p in prepared.items()}
    if not args.quiet:
        for row, r in rows.items():
            summary = {key: r.get(key) for key in ("status", "tokens_per_s", "fvu", "dead_pct", "mean_best_cosine",
                                                   "frac_recovered", "peak_rss_mib", "reason")}
            print(f"[{row}] {json.dumps(summary)}", flush=True)
    add_ratios(rows)
    end_probe = idle_probe(args.d, args.n)
    report = {
        "benchmark": "peers",
        "label": f"{args.steps * args.batch:,} training tokens per row; load average at start "
                 f"{start_probe['loadavg']}, at end {end_probe['loadavg']}",
        "settings": {"d": args.d, "n": args.n, "k": args.k, "batch": args.batch, "dtype": "float32",
                     "threads": args.threads, "steps": args.steps, "train_tokens": args.steps * args.batch,
                     "lr": args.lr, "lr_warmup": args.lr_warmup, "seed": args.seed,
                     "timing": {"warmup_steps": args.timing_warmup, "repeats": args.repeats,
                                "statistic": "median of the windows' tokens/s",
                                "rows": f"in turns of {args.turn_steps} steps" if args.turn_steps
                                else "one after another"},
                     "data": data.meta | {"file": str(data_path)}},
        "command": "python -m bench.peers " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": describe_machine("cpu"),
        "code": changed_files(),
        "idle_check": {"start": start_probe, "end": end_probe},
        "rows": rows,
        "notes": NOTES,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    if not args.quiet:
        print(markdown(report))
    return report


if __name__ == "__main__":
    main()
