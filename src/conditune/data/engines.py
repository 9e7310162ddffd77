"""Speech engines and the voice catalogue of ``conditune data synth``.

| engine | program | voices | prosody varied | Debian package |
| --- | --- | --- | --- | --- |
| ``mbrola`` | espeak-ng + mbrola | mb-us1, mb-us2, mb-en1 (en); mb-de1, mb-de3, mb-de5, mb-de7 (de): diphones recorded from human speakers | rate, pitch | mbrola, mbrola-<voice> |
| ``pico`` | pico2wave | en-US, en-GB, de-DE | rate, pitch (SSML-like markup) | libttspico-utils |
| ``festival`` | festival --pipe | cmu_us_slt_arctic_hts (HMM voice trained on a human speaker), kal_diphone (en) | rate | festival, festvox-us-slt-hts, festvox-kallpc16k |
| ``flite`` | flite | kal16, awb, rms, slt (en) | rate, mean F0 | flite |
| ``espeak-ng`` | espeak-ng | formant synthesis, every language; eight English accents | rate, pitch, variant | espeak-ng |

A voice is named ``engine:voice`` (``mbrola:mb-us2``, ``pico:de-DE``). :data:`VOICES` lists them
with their weight in the training mix: the voices derived from human recordings (MBROLA, Pico,
HTS and flite's clustergen voices) carry most of it, espeak-ng's formant voices the rest.
:func:`available_engines` finds what is installed; :func:`missing_engines` says what is not, with the
package to install.
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np

from conditune.errors import CondituneError


class EngineError(Exception):
    pass


class Engine:
    name = ""

    def synthesize(self, text: str, params: Mapping[str, Any], scratch: Path) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def version(self) -> str:
        return ""

    def close(self) -> None:
        """Stop helper processes (festival keeps one per thread)."""


def _run(cmd: list[str], text: str | None = None, timeout: float = 120) -> None:
    try:
        done = subprocess.run(
            cmd, input=None if text is None else text.encode("utf-8"), capture_output=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"{cmd[0]}: {exc}") from None
    if done.returncode != 0:
        message = " ".join(done.stderr.decode("utf-8", "replace").split())[:300]
        raise EngineError(f"{Path(cmd[0]).name} exited with status {done.returncode}: {message}")


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001
        raise EngineError(f"engine wrote no readable audio: {exc}") from None
    return data, int(rate)


class EspeakCLI(Engine):
    name = "espeak-ng"

    def __init__(self, exe: str):
        self.exe = exe

    def synthesize(self, text, params, scratch):
        out = scratch / "espeak.wav"
        _run(
            [
                self.exe,
                "-b",
                "1",
                "-v",
                params["voice"],
                "-s",
                str(params["speed"]),
                "-p",
                str(params["pitch"]),
                "-w",
                str(out),
                "--stdin",
            ],
            text,
        )
        return _read_wav(out)

    def version(self) -> str:
        try:
            done = subprocess.run([self.exe, "--version"], capture_output=True, timeout=30)
            return " ".join(done.stdout.decode("utf-8", "replace").split())
        except (OSError, subprocess.TimeoutExpired):
            return ""


class EspeakLibrary(Engine):
    """libespeak-ng from the ``espeakng-loader`` wheel, through ctypes (one synthesis at a time)."""

    name = "espeak-ng"
    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self):
        import espeakng_loader

        self._lock = threading.Lock()
        self._chunks: list[np.ndarray] = []
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        rate = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)  # 2: synchronous
        if rate <= 0:
            raise EngineError("libespeak-ng from espeakng-loader failed to initialise")
        self.rate = rate
        self._callback = self._CALLBACK(self._collect)  # keep a reference: ctypes does not
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib

    def _collect(self, wav, count, _events) -> int:
        if count > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def synthesize(self, text, params, scratch):
        with self._lock:
            self._chunks = []
            if self.lib.espeak_SetVoiceByName(params["voice"].encode()) != 0:
                raise EngineError(f"espeak-ng has no voice '{params['voice']}'")
            self.lib.espeak_SetParameter(1, int(params["speed"]), 0)  # espeakRATE
            self.lib.espeak_SetParameter(3, int(params["pitch"]), 0)  # espeakPITCH
            data = text.encode("utf-8")
            status = self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 1, None, None)  # 1: UTF-8
            self.lib.espeak_Synchronize()
            if status != 0 or not self._chunks:
                raise EngineError(f"libespeak-ng synthesis failed (status {status})")
            audio = np.concatenate(self._chunks).astype(np.float32) / 32768.0
        return audio[:, None], self.rate

    def version(self) -> str:
        return "libespeak-ng (espeakng-loader)"


class Flite(Engine):
    name = "flite"

    def __init__(self, exe: str):
        self.exe = exe

    def synthesize(self, text, params, scratch):
        out = scratch / "flite.wav"
        text_file = scratch / "text.txt"
        text_file.write_text(text, encoding="utf-8")
        _run(
            [
                self.exe,
                "-voice",
                params["voice"],
                "--setf",
                f"duration_stretch={params['stretch']}",
                "--setf",
                f"int_f0_target_mean={params['f0']}",
                "-f",
                str(text_file),
                "-o",
                str(out),
            ]
        )
        return _read_wav(out)

    def version(self) -> str:
        try:
            done = subprocess.run([self.exe, "--version"], capture_output=True, timeout=30)
            return " ".join(done.stdout.decode("utf-8", "replace").split())[:100]
        except (OSError, subprocess.TimeoutExpired):
            return ""


class _FestivalProcess:
    """One ``festival --pipe`` process: Scheme in on stdin, a marker line back on stdout after each command."""

    def __init__(self, exe: str):
        self.proc = subprocess.Popen(
            [exe, "--pipe"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        self.voice = ""
        self.count = 0
        self.buffer = b""

    def run(self, scheme: str, timeout: float = 120) -> None:
        self.count += 1
        marker = f"CONDITUNE-DONE-{self.count}.".encode()
        try:
            self.proc.stdin.write(f'{scheme}\n(format t "\\n{marker.decode()}\\n")\n(fflush nil)\n'.encode())
            self.proc.stdin.flush()
        except OSError as exc:
            raise EngineError(f"festival stopped: {exc}") from None
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            chunk = os.read(self.proc.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                self.close()
                raise EngineError("festival stopped answering" if left > 0 else f"festival took over {timeout:.0f} s")
            self.buffer += chunk
        self.buffer = self.buffer.split(marker, 1)[1]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Festival(Engine):
    """festival: ``kal_diphone`` (duration stretch) or an HTS voice (speech rate ``-r``).

    Each thread keeps one ``festival --pipe`` process with the voice loaded (starting festival and
    loading a voice costs more than speaking a sentence); every utterance sets all of its own
    parameters, so the audio does not depend on what was spoken before."""

    name = "festival"

    def __init__(self, exe: str):
        self.exe = exe
        self._local = threading.local()
        self._processes: list[_FestivalProcess] = []
        self._lock = threading.Lock()

    def _process(self) -> _FestivalProcess:
        process = getattr(self._local, "process", None)
        if process is None or process.proc.poll() is not None:
            process = _FestivalProcess(self.exe)
            self._local.process = process
            with self._lock:
                self._processes.append(process)
        return process

    def synthesize(self, text, params, scratch):
        out = scratch / "festival.wav"
        process = self._process()
        voice = str(params["voice"])
        if not re.fullmatch(r"[A-Za-z0-9_]+", voice):
            raise EngineError(f"festival: bad voice name {voice!r}")
        if process.voice != voice:
            process.run(f"(voice_{voice}) (set! conditune_hts_params hts_engine_params)")
            process.voice = voice
        rate = float(params.get("rate", 1.0))
        quoted = text.replace("\\", " ").replace('"', " ")
        process.run(
            f"(Parameter.set 'Duration_Stretch {float(params.get('stretch', 1.0))}) "
            f'(set! hts_engine_params (append conditune_hts_params (list (list "-r" {rate})))) '
            f'(utt.save.wave (SynthText "{quoted}") "{out}" (quote riff))'
        )
        return _read_wav(out)

    def close(self) -> None:
        with self._lock:
            for process in self._processes:
                process.close()
            self._processes.clear()

    def version(self) -> str:
        return _first_line([self.exe, "--version"])


class Pico(Engine):
    """SVOX Pico's pico2wave; rate and pitch through its markup (percent of the voice's own)."""

    name = "pico"

    def __init__(self, exe: str):
        self.exe = exe

    def synthesize(self, text, params, scratch):
        out = scratch / "pico.wav"  # pico2wave wants the .wav extension
        marked = f'<speed level="{int(params["speed"])}"><pitch level="{int(params["pitch"])}">{escape(text)}</pitch></speed>'
        _run([self.exe, "-l", params["voice"], "-w", str(out), marked])
        return _read_wav(out)

    def version(self) -> str:
        return "pico2wave (libttspico)"


class Mbrola(EspeakCLI):
    """MBROLA diphone voices driven by espeak-ng (``espeak-ng -v mb-us1``): espeak-ng's prosody, human diphones."""

    name = "mbrola"

    def version(self) -> str:
        return super().version() + " + mbrola"


def _first_line(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (done.stdout or done.stderr).decode("utf-8", "replace").strip().splitlines()
    return " ".join(text[0].split())[:100] if text else ""


# --------------------------------------------------------------------------------------------
# Voices
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Voice:
    engine: str
    name: str
    language: str
    weight: float  # share in the training mix, renormalised over the voices in use
    human: bool  # built from recordings of a human speaker (diphones, HMM, clustergen)
    package: str  # the Debian package that provides it

    @property
    def id(self) -> str:
        return f"{self.engine}:{self.name}"


MBROLA_ROOT = Path("/usr/share/mbrola")
PICO_ROOT = Path("/usr/share/pico/lang")
FESTIVAL_VOICE_ROOT = Path("/usr/share/festival/voices")

ESPEAK_VOICES = {
    "en": ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc", "en-029"),
    "de": ("de",),
}
ESPEAK_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")

# Weights follow Whisper base's WER on each voice (results/data/voices.md): the intelligible voices
# built from human recordings carry the mix, espeak-ng's formant voices little.
VOICES: tuple[Voice, ...] = (
    Voice("pico", "en-US", "en", 0.14, True, "libttspico-utils"),
    Voice("pico", "en-GB", "en", 0.14, True, "libttspico-utils"),
    Voice("festival", "cmu_us_slt_arctic_hts", "en", 0.10, True, "festvox-us-slt-hts"),
    Voice("mbrola", "mb-us1", "en", 0.10, True, "mbrola-us1"),
    Voice("mbrola", "mb-us2", "en", 0.10, True, "mbrola-us2"),
    Voice("mbrola", "mb-en1", "en", 0.08, True, "mbrola-en1"),
    Voice("flite", "slt", "en", 0.08, True, "flite"),
    Voice("flite", "rms", "en", 0.08, True, "flite"),
    Voice("flite", "awb", "en", 0.06, True, "flite"),
    Voice("flite", "kal16", "en", 0.03, True, "flite"),
    Voice("festival", "kal_diphone", "en", 0.03, True, "festvox-kallpc16k"),
    *(Voice("espeak-ng", name, "en", 0.01, False, "espeak-ng") for name in ESPEAK_VOICES["en"]),
    Voice("pico", "de-DE", "de", 0.35, True, "libttspico-utils"),
    Voice("mbrola", "mb-de1", "de", 0.20, True, "mbrola-de1"),
    Voice("mbrola", "mb-de5", "de", 0.20, True, "mbrola-de5"),
    Voice("mbrola", "mb-de7", "de", 0.20, True, "mbrola-de7"),
    Voice("mbrola", "mb-de3", "de", 0.10, True, "mbrola-de3"),
    Voice("espeak-ng", "de", "de", 0.05, False, "espeak-ng"),
)
ENGINES = ("espeak-ng", "mbrola", "pico", "festival", "flite")
ENGINE_PACKAGES = {  # what to apt-get install (Pico and MBROLA voices: Debian non-free, mbrola: contrib)
    "espeak-ng": "espeak-ng",
    "mbrola": "mbrola mbrola-us1 mbrola-us2 mbrola-en1 mbrola-de1 mbrola-de3 mbrola-de5 mbrola-de7",
    "pico": "libttspico-utils",
    "festival": "festival festvox-us-slt-hts festvox-kallpc16k",
    "flite": "flite",
}


def voices_for(language: str) -> list[Voice]:
    """The catalogue's voices for ``language``; a language it does not know gets espeak-ng's voice of that code."""
    listed = [v for v in VOICES if v.language == language]
    return listed or [Voice("espeak-ng", language, language, 1.0, False, "espeak-ng")]


def find_voice(voice_id: str) -> Voice:
    for voice in VOICES:
        if voice.id == voice_id:
            return voice
    known = ", ".join(v.id for v in VOICES)
    raise CondituneError(f"unknown voice {voice_id!r} (known: {known})")


def voice_installed(voice: Voice) -> bool:
    """Whether the voice's data is on this machine (its engine's program is checked by :func:`available_engines`)."""
    if voice.engine == "mbrola":
        short = voice.name.removeprefix("mb-")
        return (MBROLA_ROOT / short / short).is_file()
    if voice.engine == "pico":
        return any(PICO_ROOT.glob(f"{voice.name}_*"))
    if voice.engine == "festival":
        return any(FESTIVAL_VOICE_ROOT.glob(f"*/{voice.name}"))
    return True  # espeak-ng and flite voices are built in


def installed_voices(engines: Sequence[str], language: str) -> list[str]:
    """Ids of the catalogue's voices for ``language`` whose engine is in ``engines`` and whose data is installed."""
    return [v.id for v in voices_for(language) if v.engine in engines and voice_installed(v)]


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


def find_espeak() -> Engine:
    exe = shutil.which("espeak-ng")
    if exe:
        return EspeakCLI(exe)
    try:
        import espeakng_loader  # noqa: F401
    except ImportError:
        raise CondituneError(
            "espeak-ng is not installed: apt-get install espeak-ng, or pip install espeakng-loader"
        ) from None
    try:
        return EspeakLibrary()
    except (OSError, EngineError) as exc:
        raise CondituneError(f"espeakng-loader is installed but libespeak-ng does not load: {exc}") from None


def find_engine(name: str) -> Engine | None:
    if name == "mbrola":
        espeak, mbrola = shutil.which("espeak-ng"), shutil.which("mbrola")
        return Mbrola(espeak) if espeak and mbrola else None
    if name == "pico":
        exe = shutil.which("pico2wave")
        return Pico(exe) if exe else None
    if name == "festival":
        exe = shutil.which("festival")
        return Festival(exe) if exe else None
    if name == "flite":
        exe = shutil.which("flite")
        return Flite(exe) if exe else None
    raise CondituneError(f"unknown speech engine '{name}' (use {', '.join(ENGINES)})")


def missing_engines() -> dict[str, str]:
    """Engines that are not installed here -> the Debian package(s) that provide them."""
    missing = {}
    for name in ENGINES:
        if name == "espeak-ng":
            if shutil.which("espeak-ng") is None:
                missing[name] = ENGINE_PACKAGES[name]
        elif find_engine(name) is None:
            missing[name] = ENGINE_PACKAGES[name]
    return missing


def available_engines(requested: Sequence[str] | None = None) -> dict[str, Engine]:
    """Engines to use: ``None`` means every installed one; espeak-ng is always required.

    An engine asked for by name that is not installed is an error naming its package."""
    engines: dict[str, Engine] = {"espeak-ng": find_espeak()}
    wanted = ENGINES if requested is None else tuple(requested)
    for name in wanted:
        if name == "espeak-ng":
            continue
        engine = find_engine(name)
        if engine is not None:
            engines[name] = engine
        elif requested is not None:
            raise CondituneError(f"speech engine {name} is not installed: apt-get install {ENGINE_PACKAGES[name]}")
    return engines
