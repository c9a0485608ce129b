"""How long one feature page takes to appear for a large SAE: 24,576 latents (d_sae of a 32x SAE on d=768).

The feature store's size scales with the number of latents, not with the cached tokens: each latent keeps a fixed
number of contexts, samples and histogram bins. So we build a real store for a tiny run (model 'tiny'), tile every
per-latent tensor up to 24,576 latents, and time, in the same run: (a) reading one latent's record from a freshly
opened store (the cold path the app takes on a new latent), and (b) rendering the whole Feature page with
Streamlit's AppTest (a warm app: model and store resources cached, as after the first page view).

    python -m bench.feature_page
"""
import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from analysis.features import FeaturesConfig, build_features  # noqa: E402
from analysis.store import FeatureStore  # noqa: E402
from app.cli import main as saewb  # noqa: E402
from bench.machine import describe_machine  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"


def tile_store(folder: Path, d_sae: int) -> None:
    """Repeat every latent-first tensor of the store up to d_sae latents (in place)."""
    index = json.loads((folder / "index.json").read_text())
    small = index["d_sae"]
    with safe_open(str(folder / "features.safetensors"), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    reps = -(-d_sae // small)
    for name, tensor in tensors.items():
        if tensor.ndim and tensor.shape[0] == small:
            tensors[name] = tensor.repeat(reps, *([1] * (tensor.ndim - 1)))[:d_sae].contiguous()
    save_file(tensors, str(folder / "features.safetensors"))
    index["d_sae"] = d_sae
    (folder / "index.json").write_text(json.dumps(index))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", type=int, default=24_576)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/results/feature_page.json"))
    args = parser.parse_args()
    from streamlit.testing.v1 import AppTest

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "runs" / "tiny"
        saewb(["demo", "--model", "tiny", "--tokens", "16384", "--run-dir", str(run)])
        build_features(FeaturesConfig(run_dir=run, progress=False))
        tile_store(run / "features", args.latents)
        size_mb = (run / "features" / "features.safetensors").stat().st_size / 1e6
        latents = [(i * 7919) % args.latents for i in range(args.repeats)]
        cold = []
        for latent in latents:
            start = time.perf_counter()
            store = FeatureStore(run / "features")
            store.quantile_samples(store.latent(latent))
            cold.append(time.perf_counter() - start)
        os.environ["SAEWB_RUNS_DIR"] = str(run.parent)
        at = AppTest.from_file(str(APP), default_timeout=120).run()
        at.query_params["latent"] = "1"
        at.switch_page("views/feature.py").run()  # first view loads the store (cached afterwards)
        pages = []
        for latent in latents[:5]:
            start = time.perf_counter()
            at.number_input(key="latent").set_value(latent).run()
            pages.append(time.perf_counter() - start)
            assert not at.exception, at.exception
            assert any(h.value == f"Latent {latent}" for h in at.header), "the page did not show the latent"
    report = {"benchmark": "feature_page", "latents": args.latents, "store_mb": round(size_mb, 1),
              "record_load_s_median": round(statistics.median(cold), 4), "record_load_s_max": round(max(cold), 4),
              "page_render_s_median": round(statistics.median(pages), 3), "page_render_s_max": round(max(pages), 3),
              "goal_s": 1.0, "machine": describe_machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
