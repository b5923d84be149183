"""The names of the files a run folder holds (RunFolder's; here alone so that reading a run's
metrics does not import OneFlow)."""
CONFIG_FILE = "config.yaml"  # the first run's config; a resume adds RESUME_CONFIG
RESUME_CONFIG = "config-resume-{step:08d}.yaml"
METRICS_FILE = "metrics.csv"
PLOTS = ("loss", "lr", "verification")  # <name>.png, drawn from metrics.csv
LOCK_FILE = ".of_face.lock"
LEGACY_RUN_ID = "legacy"  # checkpoints written before run ids existed: one lineage of their own
