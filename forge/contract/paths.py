"""Where the launcher mounts things inside the runner container. Fixed so the runner needs no flags."""

JOB_CONFIG = "/job/forge.yaml"
DATA_ROOT = "/data"
OUTPUT_ROOT = "/out"
MODEL_CACHE = "/models"
LOCAL_MODEL = "/model"
GOLD_ROOT = "/gold"  # train.eval.gold, read-only
