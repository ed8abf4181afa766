"""Where the launcher mounts things inside the runner container. Fixed so the runner needs no flags."""

JOB_CONFIG = "/job/forge.yaml"
DATA_ROOT = "/data"
OUTPUT_ROOT = "/out"
MODEL_CACHE = "/models"
LOCAL_MODEL = "/model"
GOLD_ROOT = "/gold"  # train.eval.gold, read-only
SECRETS = "/run/secrets"  # secrets arrive as read-only files here, never as environment variables
HF_TOKEN = "/run/secrets/hf-token"  # the Hugging Face token, for a hub download only (read via HF_TOKEN_PATH)
PII_KEY = "/run/secrets/forge-pii-key"  # the key for PII hashes (forge.contract.pii_key), a read-only file
MODEL_MARKER = "forge-model.json"  # written last into a model cache entry: the entry is complete


def model_cache_entry(name: str) -> str:
    """A model's directory in the model cache (the host checks it to decide whether a download is needed)."""
    return "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in name)
