"""A private PulseAudio server with a null sink whose monitor is the default source.

What is played on the ``pulse`` ALSA device comes back on its input after the server's round trip
(300-340 ms with PULSE_LATENCY_MSEC=400; a lower value makes PortAudio glitch or spin).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

ENV_KEYS = ("XDG_RUNTIME_DIR", "PULSE_RUNTIME_PATH", "PULSE_LATENCY_MSEC", "HOME")


@dataclass
class PulseServer:
    process: subprocess.Popen
    env: dict
    folder: str
    startup_s: float

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        shutil.rmtree(self.folder, ignore_errors=True)


class PulseUnavailable(RuntimeError):
    pass


def start_pulse(rate: int = 24000, timeout_s: float = 10.0) -> PulseServer:
    for tool in ("pulseaudio", "pactl"):
        if not shutil.which(tool):
            raise PulseUnavailable(f"{tool} is not installed (Debian: apt install pulseaudio pulseaudio-utils)")
    folder = tempfile.mkdtemp(prefix="moshi-pulse-")
    os.chmod(folder, 0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=folder, PULSE_RUNTIME_PATH=f"{folder}/pulse",
               PULSE_LATENCY_MSEC="400", HOME=folder)
    start = time.perf_counter()
    proc = subprocess.Popen(
        ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit", "--log-target=stderr",
         "--log-level=error", "-L", "module-native-protocol-unix",
         "-L", f"module-null-sink sink_name=loop rate={rate} channels=1 sink_properties=device.description=loop",
         "-L", "module-always-sink"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server = PulseServer(proc, env, folder, 0.0)
    while subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode:
        if proc.poll() is not None:
            err = proc.stderr.read().strip().splitlines()
            server.stop()
            raise PulseUnavailable(f"pulseaudio exited: {err[-1] if err else proc.returncode}")
        if time.perf_counter() - start > timeout_s:
            server.stop()
            raise PulseUnavailable(f"pulseaudio did not answer within {timeout_s:.0f} s")
        time.sleep(0.02)
    for cmd in (["pactl", "set-default-sink", "loop"], ["pactl", "set-default-source", "loop.monitor"]):
        subprocess.run(cmd, env=env, check=True, capture_output=True)
    server.startup_s = time.perf_counter() - start
    return server
