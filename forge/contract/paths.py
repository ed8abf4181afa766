"""Where the launcher mounts things inside the runner container. Fixed so the runner needs no flags."""

JOB_CONFIG = "/job/forge.yaml"
DATA_ROOT = "/data"
OUTPUT_ROOT = "/out"
MODEL_CACHE = "/models"
LOCAL_MODEL = "/model"
GOLD_ROOT = "/gold"  # train.eval.gold, read-only
PII_KEY = "/run/secrets/forge-pii-key"  # the key for PII hashes (forge.contract.pii_key), a read-only file
