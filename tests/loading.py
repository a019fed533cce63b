"""Loading a model with its tokenizer in one call, as the tests do."""

from pipeline.models import load_model, load_tokenizer


def load_model_and_tokenizer(
    name: str, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False, keep_on_cpu: bool = False
):
    """(load_model(...), load_tokenizer(...))."""
    return (load_model(name, dtype, device, trust_remote_code, keep_on_cpu), load_tokenizer(name, trust_remote_code))
