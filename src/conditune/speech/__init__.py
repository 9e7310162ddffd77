"""Speech LLM: frozen Whisper encoder (the processor's) -> adaptor + CTC head -> condition-number-selected LLM.

>>> from conditune.speech import SpeechLLM, SpeechProcessor
>>> model = SpeechLLM.from_pretrained("runs/demo/train/final")
>>> processor = SpeechProcessor.from_pretrained("runs/demo/train/final")
>>> from conditune.evaluation.transcription import transcribe
>>> transcribe(model, processor, ["audio.wav"])

or through transformers: :func:`conditune.speech.pipeline.speech_recognition_pipeline`.
"""

from conditune.speech.configuration import (
    AdaptorConfig,
    CTCConfig,
    EncoderConfig,
    LLMConfig,
    LoRAConfig,
    SpeechLLMConfig,
    TrainableConfig,
)

__all__ = [
    "AdaptorConfig",
    "CTCConfig",
    "EncoderConfig",
    "LLMConfig",
    "LoRAConfig",
    "SpeechLLM",
    "SpeechLLMConfig",
    "SpeechProcessor",
    "TrainableConfig",
]


def __getattr__(name):
    if name == "SpeechLLM":
        from conditune.speech.modeling import SpeechLLM

        return SpeechLLM
    if name == "SpeechProcessor":
        from conditune.speech.processing import SpeechProcessor

        return SpeechProcessor
    raise AttributeError(name)
