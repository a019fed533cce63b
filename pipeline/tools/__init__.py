"""Tools beside the pipeline, each run by a job of its own: the bench (hot paths against their baselines), the
memory formula (checked by measurement) and the pretraining that builds the embedded models. Nothing on the way
from a job to the IMP loop imports them."""
