"""A trained speech LLM behind transformers' ``pipeline("automatic-speech-recognition", ...)``.

>>> from conditune.speech.pipeline import speech_recognition_pipeline
>>> asr = speech_recognition_pipeline("runs/demo/train/final")
>>> asr("audio.wav")["text"]

or, with transformers' own factory and the objects at hand::

    from transformers import pipeline
    from conditune.speech.pipeline import SpeechRecognitionPipeline
    asr = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                   feature_extractor=processor.feature_extractor, pipeline_class=SpeechRecognitionPipeline)

The pipeline is also registered as the task ``conditune-speech-recognition`` (importing this module
registers it), so ``pipeline("conditune-speech-recognition", model=model, ...)`` works without
``pipeline_class``. It reads files and bytes (decoded with soundfile, as everywhere in conditune) and
arrays, resamples to 16 kHz, and batches (``batch_size=``); generation is greedy unless ``num_beams`` is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import GenerationConfig
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.automatic_speech_recognition import AutomaticSpeechRecognitionPipeline

from conditune.speech.modeling import SpeechLLM

TASK = "conditune-speech-recognition"


class SpeechRecognitionPipeline(AutomaticSpeechRecognitionPipeline):
    """transformers' ASR pipeline (input handling, batching, decoding) driving a :class:`SpeechLLM`: the feature
    extractor turns audio into frozen-encoder frames and ``model.generate`` writes the transcript's tokens."""

    # the components come from the speech model's processor, never from a hub
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_processor = False
    _load_image_processor = False
    _default_generation_config = GenerationConfig(max_new_tokens=128, num_beams=1)

    def __init__(self, model: SpeechLLM, feature_extractor=None, tokenizer=None, **kwargs: Any):
        super().__init__(model=model, feature_extractor=feature_extractor, tokenizer=tokenizer, **kwargs)
        self.type = "seq2seq"  # transcripts are generated token by token, not read off CTC frames

    def preprocess(self, inputs, chunk_length_s=0, stride_length_s=None):
        # files and encoded bytes are decoded as everywhere in conditune (soundfile + resampling), so no ffmpeg
        # is needed; URLs, arrays and {"raw", "sampling_rate"} dicts take transformers' own path
        from conditune.data.audio import decode_audio_bytes, load_audio

        if isinstance(inputs, (str, Path)) and not str(inputs).startswith(("http://", "https://")):
            inputs = load_audio(inputs)
        elif isinstance(inputs, bytes):
            inputs = decode_audio_bytes(inputs)
        yield from super().preprocess(inputs, chunk_length_s=chunk_length_s, stride_length_s=stride_length_s)


def speech_recognition_pipeline(
    model: SpeechLLM | str | Path, *, processor=None, device: str | int | None = -1, **kwargs: Any
) -> SpeechRecognitionPipeline:
    """The ASR pipeline of a trained model folder (or of a loaded model and its processor). ``device``: -1 for the
    CPU, a GPU index, or a device name."""
    from transformers import pipeline

    from conditune.speech.processing import SpeechProcessor

    if not isinstance(model, SpeechLLM):
        processor = processor or SpeechProcessor.from_pretrained(model)
        model = SpeechLLM.from_pretrained(model)
    if processor is None:
        raise ValueError("a loaded SpeechLLM needs its processor (SpeechProcessor.from_pretrained(folder))")
    model.eval()
    return pipeline(
        "automatic-speech-recognition",
        model=model,
        tokenizer=processor.tokenizer,
        feature_extractor=processor.feature_extractor,
        pipeline_class=SpeechRecognitionPipeline,
        device=device,
        **kwargs,
    )


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=SpeechRecognitionPipeline, pt_model=SpeechLLM)
