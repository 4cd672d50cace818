"""The names of what a trial reports, declared once, in a module that imports nothing: the trainer
writes them (trainer.train), and the orchestrator's status, console, report and tables read them
without loading torch. A metric renamed here is renamed everywhere."""

LOSS = "loss"
IMAGES_PER_SEC = "images_per_sec"
PSNR_GAP = "psnr_gap"  # train minus held-out PSNR of the one-step denoiser (trainer.metrics)
PSNR_TRAIN = "psnr_train"
PSNR_TEST = "psnr_test"
FID = "fid"
KID = "kid"
KID_STD = "kid_std"
RESUMED_FROM_STEP = "resumed_from_step"
# trainer.memorization, on the sample grid. `mem_` in these stored names means memorization (never memory:
# a trial's bytes are trainer.footprint's); the names stay as they are because they are the metric keys
# of users' existing MLflow stores, and renaming them would orphan those runs' columns.
MEMORIZATION_COPY_FRACTION = "mem_copy_fraction"
MEMORIZATION_NN_TRAIN = "mem_nn_train"
MEMORIZATION_NN_TEST = "mem_nn_test"
MEMORIZATION_CLOSER_TO_TRAIN = "mem_closer_to_train"
ATTENTION_DISTANCE = "attn_distance.block_"  # + block index (trainer.locality)

# What `report(metrics, ...)` carries, declared once: the metrics a trial logs, plus the step counter
# and the PSNR curve record (not metrics: the curve becomes an artifact when the trial ends).
TRIAL_METRICS = (
    LOSS, IMAGES_PER_SEC, PSNR_GAP, PSNR_TRAIN, PSNR_TEST, FID, KID, KID_STD, RESUMED_FROM_STEP,
    MEMORIZATION_COPY_FRACTION, MEMORIZATION_NN_TRAIN, MEMORIZATION_NN_TEST, MEMORIZATION_CLOSER_TO_TRAIN,
)
STEP = "step"
PSNR_CURVE = "psnr_curve"
