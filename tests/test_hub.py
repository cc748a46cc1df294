"""product/hub.py against a fake Hugging Face hub served on 127.0.0.1, so nothing here needs the network.

The fake hub answers the few requests huggingface_hub makes to download a model repo:
  GET  /api/models/{repo}[/revision/{rev}] repo info: its commit `sha` (what `main` points to)
  GET  /api/models/{repo}/tree/{rev}       the file list (?recursive=True), with sizes and LFS sha256s
  HEAD /{repo}/resolve/{rev}/{path}        file metadata: X-Repo-Commit, ETag / X-Linked-Etag, Content-Length
  GET  /{repo}/resolve/{rev}/{path}        the file itself
and, like huggingface.co, a 401 with `X-Error-Code: RepoNotFound` for a repo it does not have. Every request
is logged, so the tests can say which files were fetched (and that a cached run fetches none).
huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE when imported, so `download` runs in a
subprocess with its own environment.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from product.hub import select_hub_files

ROOT = Path(__file__).resolve().parent.parent  # the repo root, where the package product/ lives
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"

# What a PyTorch load of SDXL needs: configs, tokenizers and the fp16 safetensors of the four models.
NEEDED = [
    "model_index.json", "scheduler/scheduler_config.json",
    "unet/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
    *[f"{t}/{f}" for t in ("tokenizer", "tokenizer_2")
      for f in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")],
    "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors",
]
# Everything else the real repo holds (see FILES.md): none of it may be downloaded.
NOT_NEEDED = [
    ".gitattributes", "README.md", "LICENSE.md", "01.png",
    "sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors", "sd_xl_offset_example-lora_1.0.safetensors",
    "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_flax_model.msgpack", "unet/model.onnx",
    "unet/model.onnx_data", "unet/openvino_model.xml", "unet/openvino_model.bin",
    "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_flax_model.msgpack",
    "vae/openvino_model.xml", "vae/openvino_model.bin",
    "vae_1_0/config.json", "vae_1_0/diffusion_pytorch_model.safetensors", "vae_1_0/diffusion_pytorch_model.fp16.safetensors",
    "vae_decoder/config.json", "vae_decoder/model.onnx", "vae_encoder/config.json", "vae_encoder/model.onnx",
    *[f"{t}/{f}" for t in ("text_encoder", "text_encoder_2") for f in (
        "model.safetensors", "flax_model.msgpack", "model.onnx", "openvino_model.xml", "openvino_model.bin",
        "pytorch_model.bin")],
]


def dummy_repo(paths):
    """Tiny distinct bytes per file (the content names the file, so a mix-up shows)."""
    return {p: f"dummy contents of {p}\n".encode() for p in paths}


def plain_components(stem_files):
    return [f"{c}/{s}" for c in ("unet", "vae") for s in stem_files("diffusion_pytorch_model")] + \
           [f"{c}/{s}" for c in ("text_encoder", "text_encoder_2") for s in stem_files("model")]


CONFIGS = NEEDED[:14]
PLAIN = plain_components(lambda s: [f"{s}.safetensors"])  # unet, vae, text_encoder, text_encoder_2


def sharded(stem, variant, n):
    """Shard and index names as diffusers/transformers `save_pretrained(variant=...)` write them."""
    v = f".{variant}" if variant else ""
    return [f"{stem}.safetensors.index{v}.json"] + [f"{stem}{v}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


REPOS = {
    SDXL: dummy_repo(NEEDED + NOT_NEEDED),
    # an fp32-only repo (no fp16 variant): the plain safetensors are the ones to take
    "someone/sdxl-fp32": dummy_repo(CONFIGS + plain_components(lambda s: [f"{s}.safetensors", f"{s}.bin"])),
    # a repo whose unet holds only a pickle
    "someone/sdxl-pickled-unet": dummy_repo(CONFIGS + ["unet/diffusion_pytorch_model.bin"] + PLAIN[1:]),
    # a sharded unet, fp16 and fp32
    "someone/sdxl-sharded": dummy_repo(CONFIGS + PLAIN[1:] + [f"unet/{f}" for f in sharded("diffusion_pytorch_model", "fp16", 3)
                                                              + sharded("diffusion_pytorch_model", None, 5)]),
}


# ----------------------------------------------------------------------------------------------------------
# The fake hub

def is_lfs(path):  # what .gitattributes sends to LFS on the hub: the weights, not the configs
    return path.endswith((".safetensors", ".bin", ".msgpack", ".onnx", ".onnx_data", ".png"))


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repos):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos = repos
        self.commits = {r: hashlib.sha1(json.dumps(sorted(files)).encode()).hexdigest() for r, files in repos.items()}
        self.log = []  # (method, path) of every request, in order
        self.lock = threading.Lock()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def requests_since(self, n):
        with self.lock:
            return list(self.log[n:])


class HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean; requests go to server.log instead
        pass

    def do_HEAD(self):
        self.handle_request(send_body=False)

    def do_GET(self):
        self.handle_request(send_body=True)

    def reply(self, status, body=b"", headers=(), send_body=True, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def handle_request(self, send_body):
        hub = self.server
        path = unquote(urlsplit(self.path).path)
        with hub.lock:
            hub.log.append((self.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) == 4:  # repo info of the default branch
            repo, kind, rev = "/".join(parts[2:4]), "revision", "main"
        elif parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, kind, rev = "/".join(parts[2:4]), parts[4], parts[5]
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo, kind, rev = "/".join(parts[:2]), "resolve", parts[3]
        else:
            return self.reply(404, b'{"error": "not found"}', send_body=send_body)
        if repo not in hub.repos:  # what huggingface.co answers (to a request without a token) for a missing repo
            return self.reply(401, b'{"error": "Repository not found"}', send_body=send_body, headers=[
                ("X-Error-Code", "RepoNotFound"), ("X-Error-Message", "Invalid username or password.")])
        files, commit = hub.repos[repo], hub.commits[repo]
        if rev not in ("main", commit):
            return self.reply(404, b'{"error": "Invalid rev id"}', headers=[("X-Error-Code", "RevisionNotFound")],
                              send_body=send_body)
        if kind == "revision":
            info = {"id": repo, "sha": commit, "private": False, "siblings": [{"rfilename": f} for f in files]}
            return self.reply(200, json.dumps(info).encode(), send_body=send_body)
        if kind == "tree":
            folders = sorted({"/".join(f.split("/")[:i]) for f in files for i in range(1, f.count("/") + 1)})
            tree = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                    for d in folders]
            for f, data in files.items():
                entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": f}
                if is_lfs(f):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                tree.append(entry)
            return self.reply(200, json.dumps(tree).encode(), send_body=send_body)
        name = "/".join(parts[4:])
        if name not in files:
            return self.reply(404, b'{"error": "Entry not found"}', send_body=send_body, headers=[
                ("X-Error-Code", "EntryNotFound"), ("X-Repo-Commit", commit)])
        data = files[name]
        headers = [("X-Repo-Commit", commit), ("ETag", f'"{git_blob_sha1(data)}"')]
        if is_lfs(name):  # the hub names an LFS file's blob by its sha256
            headers += [("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"'), ("X-Linked-Size", str(len(data)))]
        self.reply(200, data, headers, send_body, content_type="application/octet-stream")


@pytest.fixture(scope="module")
def hub():
    server = FakeHub(REPOS)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def dead_endpoint():
    """A loopback port nobody listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ----------------------------------------------------------------------------------------------------------
# Running hub.download in a fresh interpreter

SCRIPT = """
import json, sys
from product import hub
results = []
for args, kwargs in json.loads(sys.argv[1]):
    try:
        results.append({"path": hub.download(*args, **kwargs)})
    except Exception as e:
        results.append({"error": type(e).__name__, "message": str(e)})
print("RESULTS " + json.dumps(results))
"""


def run_download(endpoint, cache, *calls, offline=False):
    """Run `hub.download(*args, **kwargs)` for each call in one subprocess; returns (results, seconds)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING")) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache), HF_HOME=str(Path(cache).parent / "hf_home"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
               HF_HUB_OFFLINE="1" if offline else "0", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    calls = [c if isinstance(c, tuple) else ([c], {}) for c in calls]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(calls)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULTS ")]
    assert p.returncode == 0 and lines, p.stdout + p.stderr
    return json.loads(lines[-1][len("RESULTS "):]), seconds


def file_gets(requests, repo=SDXL):
    """Repo paths of the files fetched (GET .../resolve/{rev}/{path})."""
    prefix = f"/{repo}/resolve/"
    return [p[len(prefix):].split("/", 1)[1] for m, p in requests if m == "GET" and p.startswith(prefix)]


def snapshot_files(folder):
    return {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------------------------------
# Downloading SDXL: once, then from the cache

@pytest.fixture(scope="module")
def first_download(hub, tmp_path_factory):
    """One `download(SDXL)` into an empty cache: (its result, the requests it made, the cache folder)."""
    cache = tmp_path_factory.mktemp("hf") / "cache"
    n = len(hub.log)
    (result,), _ = run_download(hub.url, cache, SDXL)
    return result, hub.requests_since(n), cache


def test_download_fetches_only_configs_tokenizers_and_fp16_weights(hub, first_download):
    result, requests, cache = first_download
    assert "path" in result, result
    gets = file_gets(requests)
    assert sorted(gets) == sorted(NEEDED)  # each needed file exactly once, nothing else
    fetched_or_probed = {p.split("/resolve/", 1)[1].split("/", 1)[1] for _, p in requests if "/resolve/" in p}
    assert not fetched_or_probed & set(NOT_NEEDED)

    # the standard HF cache layout: models--{org}--{name}/{refs/main, snapshots/{commit}/..., blobs/{etag}}
    repo_dir = cache / "models--stabilityai--stable-diffusion-xl-base-1.0"
    commit = hub.commits[SDXL]
    assert Path(result["path"]) == repo_dir / "snapshots" / commit
    assert (repo_dir / "refs" / "main").read_text() == commit
    assert snapshot_files(result["path"]) == set(NEEDED)
    for f in NEEDED:
        local = Path(result["path"], f)
        data = REPOS[SDXL][f]
        assert local.read_bytes() == data
        blob = hashlib.sha256(data).hexdigest() if is_lfs(f) else git_blob_sha1(data)
        assert local.resolve() == (repo_dir / "blobs" / blob).resolve()


def test_second_download_fetches_nothing(hub, first_download):
    first, _, cache = first_download
    n = len(hub.log)
    (result,), _ = run_download(hub.url, cache, SDXL)
    requests = hub.requests_since(n)
    assert result == first
    # one request, to learn the commit `main` points to; the file list and the files come from the cache
    assert requests == [("GET", f"/api/models/{SDXL}")]


@pytest.fixture(scope="module", params=["offline", "unreachable"])
def no_hub(request, hub, first_download):
    """Without the hub (HF_HUB_OFFLINE=1, or nothing listening at HF_ENDPOINT): download SDXL, which the first
    download cached, and a repo never downloaded. Returns (mode, results, seconds, requests to the fake hub, cache)."""
    _, _, cache = first_download
    offline = request.param == "offline"
    n = len(hub.log)
    # offline mode points at the live fake hub, to show that not a single request reaches it
    results, seconds = run_download(hub.url if offline else dead_endpoint(), cache, SDXL, "someone/sdxl-fp32",
                                    offline=offline)
    return request.param, results, seconds, hub.requests_since(n), cache


def test_without_hub_the_cache_is_used(no_hub, first_download):
    mode, (cached, _), seconds, requests, _ = no_hub
    assert cached == first_download[0]
    assert requests == []
    # huggingface_hub's listing calls retry a refused connection for ~25 s: download must not wait for them
    assert seconds < 10, f"{mode}: {seconds:.1f} s"


def test_without_hub_or_cache_one_clear_line(no_hub):
    mode, (_, missing), seconds, _, cache = no_hub
    assert missing["error"] == "FileNotFoundError"
    msg = missing["message"]
    assert "\n" not in msg and "cannot reach the hub for 'someone/sdxl-fp32'" in msg and str(cache) in msg, msg
    assert ("OfflineModeIsEnabled" if mode == "offline" else "ConnectError") in msg
    assert seconds < 10, f"{mode}: {seconds:.1f} s"


# ----------------------------------------------------------------------------------------------------------
# Other repos: no fp16 variant, variant=None, a pickled unet, a repo that does not exist

@pytest.fixture(scope="module")
def other_repos(hub, tmp_path_factory):
    """Download each into one fresh cache: returns ({repo or call: result}, requests, cache)."""
    cache = tmp_path_factory.mktemp("hf") / "cache"
    n = len(hub.log)
    calls = ["someone/sdxl-fp32", ([SDXL], {"variant": None}), "someone/sdxl-sharded", "someone/sdxl-pickled-unet",
             "someone/no-such-repo"]
    results, _ = run_download(hub.url, cache, *calls)
    keys = ["fp32", "sdxl variant=None", "sharded", "pickled", "missing"]
    return dict(zip(keys, results)), hub.requests_since(n), cache



def test_repo_without_fp16_gives_plain_safetensors(other_repos):
    results, requests, _ = other_repos
    assert sorted(file_gets(requests, "someone/sdxl-fp32")) == sorted(CONFIGS + PLAIN)  # not the .bin pickles
    assert snapshot_files(results["fp32"]["path"]) == set(CONFIGS + PLAIN)


def test_variant_none_gives_plain_safetensors(other_repos):
    results, requests, _ = other_repos
    assert sorted(file_gets(requests, SDXL)) == sorted(CONFIGS + PLAIN)
    assert snapshot_files(results["sdxl variant=None"]["path"]) == set(CONFIGS + PLAIN)


def test_sharded_repo_gives_index_and_all_shards(other_repos):
    results, requests, _ = other_repos
    want = CONFIGS + [f"unet/{f}" for f in sharded("diffusion_pytorch_model", "fp16", 3)] + PLAIN[1:]
    assert sorted(file_gets(requests, "someone/sdxl-sharded")) == sorted(want)
    assert snapshot_files(results["sharded"]["path"]) == set(want)


def test_repo_without_unet_safetensors_names_unet(other_repos):
    results, requests, _ = other_repos
    assert results["pickled"]["error"] == "FileNotFoundError"
    msg = results["pickled"]["message"]
    assert "\n" not in msg and msg.startswith("hub repo has no unet/diffusion_pytorch_model.safetensors"), msg
    assert file_gets(requests, "someone/sdxl-pickled-unet") == []


def test_missing_repo_is_one_clear_line(other_repos):
    results, requests, _ = other_repos
    assert any(p.startswith("/api/models/someone/no-such-repo") for _, p in requests)  # the hub was asked, said 401
    assert results["missing"]["error"] == "FileNotFoundError"
    msg = results["missing"]["message"]
    assert "\n" not in msg and msg.startswith("hub repo 'someone/no-such-repo' not found"), msg


def test_select_sharded_weights():
    repo = CONFIGS + [f"unet/{f}" for f in sharded("diffusion_pytorch_model", "fp16", 3) + sharded("diffusion_pytorch_model", None, 5)]
    repo += [f"vae/{f}" for f in sharded("diffusion_pytorch_model", None, 2)]  # sharded, no fp16 variant
    repo += ["text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors"]
    repo += [f"text_encoder_2/{f}" for f in sharded("model", "fp16", 2) + ["model.safetensors"]]
    chosen = select_hub_files(repo, "fp16")
    assert sorted(chosen) == sorted(
        CONFIGS + [f"unet/{f}" for f in sharded("diffusion_pytorch_model", "fp16", 3)]
        + [f"vae/{f}" for f in sharded("diffusion_pytorch_model", None, 2)]
        + ["text_encoder/model.fp16.safetensors"] + [f"text_encoder_2/{f}" for f in sharded("model", "fp16", 2)])
    plain = select_hub_files(repo, None)
    assert sorted(f for f in plain if f.startswith("unet/diffusion")) == \
        sorted(f"unet/{f}" for f in sharded("diffusion_pytorch_model", None, 5))
    assert "text_encoder_2/model.safetensors" in plain


def test_select_sdxl_listing():
    assert sorted(select_hub_files(REPOS[SDXL], "fp16")) == sorted(NEEDED)
