"""Find SDXL's files on the Hugging Face hub: pick only what we need, download it once, work offline after.

A diffusers SDXL repo holds far more than a PyTorch load needs (fp32 *and* fp16 weights, Flax, ONNX, OpenVINO
exports, two 7 GB single-file checkpoints). `select_hub_files` picks the configs, the tokenizers and one set of
safetensors weights per model -- the fp16 variant where the repo has one -- and `download` fetches just those
into the standard HF cache, so a second run downloads nothing.
"""
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"  # the one hub id every CLI defaults to
MODEL_COMPONENTS = {  # folder -> stem of its weight files
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
CONFIG_FILES = ["model_index.json", "scheduler/scheduler_config.json"] + [f"{c}/config.json" for c in MODEL_COMPONENTS] \
    + [f"{t}/{f}" for t in ("tokenizer", "tokenizer_2") for f in TOKENIZER_FILES]



def component_weight_files(comp, repo_files, variant="fp16"):
    """The weight files of one model folder (`unet`, `vae`, ...) among `repo_files` (paths relative to the repo):
    `<stem>.<variant>.safetensors` where present (half the download), else the plain `<stem>.safetensors`, each
    possibly sharded as diffusers/transformers save them: the index `<stem>.safetensors.index[.<variant>].json`
    plus every shard `<stem>[.<variant>]-00001-of-0000N.safetensors`. [] if there is none."""
    stem = MODEL_COMPONENTS[comp]
    for v in ([f".{variant}"] if variant else []) + [""]:
        if f"{comp}/{stem}{v}.safetensors" in repo_files:
            return [f"{comp}/{stem}{v}.safetensors"]
        if f"{comp}/{stem}.safetensors.index{v}.json" in repo_files:
            return [f"{comp}/{stem}.safetensors.index{v}.json"] + sorted(
                f for f in repo_files if f.startswith(f"{comp}/{stem}{v}-") and f.endswith(".safetensors"))
    return []


def select_hub_files(repo_files, variant="fp16"):
    """The files of a diffusers SDXL repo that we need: configs, tokenizers and one set of weights per model.
    Pickles, Flax/ONNX/OpenVINO exports and the single-file checkpoints are never selected."""
    repo_files = set(repo_files)
    wanted = [f for f in CONFIG_FILES if f in repo_files]
    for comp, stem in MODEL_COMPONENTS.items():
        files = component_weight_files(comp, repo_files, variant)
        if not files:
            raise FileNotFoundError(f"hub repo has no {comp}/{stem}.safetensors (nor a {variant} variant): is it an SDXL diffusers repo?")
        wanted += files
    return wanted


CONNECT_TIMEOUT, READ_TIMEOUT = 10.0, 15.0  # seconds; huggingface_hub's client has none by default


def use_timeouts():
    """Connect and read timeouts on every request of huggingface_hub's shared HTTP client, before any call: without
    them a hub that accepts the connection and never answers hangs every tool forever. Its calls pass timeout=None
    (= wait forever) per request, so the limits are filled in by a request hook, not the client's default. Retries
    stay bounded by huggingface_hub's own backoff (at most 5; none for the first revision lookup)."""
    import huggingface_hub as hf
    from huggingface_hub.utils import _http

    limits = {"connect": CONNECT_TIMEOUT, "read": READ_TIMEOUT, "write": READ_TIMEOUT, "pool": READ_TIMEOUT}

    def bound(request):
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {k: given.get(k) if given.get(k) is not None else v for k, v in limits.items()}

    def client():
        c = _http.default_client_factory()
        c.event_hooks["request"].append(bound)
        return c
    hf.set_client_factory(client)


def download(repo_id, patterns=None, variant="fp16"):
    """Fetch `repo_id` from the hub into the HF cache and return the local snapshot folder.

    `main` is resolved to a commit first, with one request and no retries (huggingface_hub's listing calls retry a
    refused connection for ~25 s); offline (or with HF_HUB_OFFLINE=1) the commit an earlier run recorded in the
    cache is used. That commit's file list (cached by the last download, else fetched) goes through
    `select_hub_files`, and `snapshot_download` fetches only those files: the ones already cached, pinned by the
    commit, cost no request. With neither network nor cache we stop with one line that says so.
    """
    import huggingface_hub as hf
    from huggingface_hub.errors import (CachedRepoTreeNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    use_timeouts()
    try:
        revision = hf.resolve_revision(repo_id)
        if patterns is None:
            try:  # a commit's file list never changes: reuse the one an earlier download cached
                files = [f.path for f in hf.get_cached_repo_tree(repo_id, revision=revision)]
            except CachedRepoTreeNotFoundError:
                files = hf.list_repo_files(repo_id, revision=revision.resolved)
            patterns = select_hub_files(files, variant)
        return hf.snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except GatedRepoError:
        raise FileNotFoundError(f"hub repo '{repo_id}' is gated: accept its licence on the hub and run "
                                f"`hf auth login`, or pass a local folder") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"hub repo '{repo_id}' not found: check the id (or log in if it is private), "
                                f"or pass a local folder") from None
    except Exception as error:  # no network (or the hub is down) and the files are not all cached
        if isinstance(error, FileNotFoundError) and not isinstance(error, LocalEntryNotFoundError):
            raise  # our own "not an SDXL repo" from select_hub_files
        raise FileNotFoundError(
            f"cannot reach the hub for '{repo_id}' ({type(error.__cause__ or error).__name__}) and it is not (fully) "
            f"in the Hugging Face cache ({hf.constants.HF_HUB_CACHE}): connect once, or pass a local folder (with the "
            f"files cached, HF_HUB_OFFLINE=1 skips the hub)") from None
