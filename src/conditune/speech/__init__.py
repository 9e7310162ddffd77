"""Speech LLM: frozen Whisper encoder + trainable adaptor + condition-number-selected LLM tensors."""

from conditune.speech.config import (
    AdaptorConfig,
    EncoderConfig,
    LLMConfig,
    LoRAConfig,
    SpeechLLMConfig,
    TrainableConfig,
)

__all__ = [
    "AdaptorConfig",
    "EncoderConfig",
    "LLMConfig",
    "LoRAConfig",
    "SpeechLLM",
    "SpeechLLMConfig",
    "TrainableConfig",
]


def __getattr__(name):
    if name == "SpeechLLM":
        from conditune.speech.modeling import SpeechLLM

        return SpeechLLM
    raise AttributeError(name)
