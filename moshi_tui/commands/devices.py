"""`moshi devices`: the sound devices PortAudio sees, and a loopback check of the chosen pair."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

EPILOG = """\
Examples:

\b
  moshi devices                                  # what can be used, with the defaults marked
  moshi devices --test                           # play a tone on the default output, listen on the default input
  moshi devices --test -i USB -o 3               # a device by part of its name, or by index
"""


def register(app: typer.Typer) -> None:
    app.command(short_help="List sound devices; --test checks the speaker-to-microphone path.",
                epilog=EPILOG)(devices)


def devices(
    test: Annotated[bool, typer.Option(
        "--test", help="Play a chirp and a 1 kHz tone on the output, record the input meanwhile, and report "
                       "what it heard and the measured round-trip delay.")] = False,
    input_device: Annotated[Optional[str], typer.Option(
        "--input-device", "-i", metavar="INDEX_OR_NAME", help="Input for --test (default: the system's).")] = None,
    output_device: Annotated[Optional[str], typer.Option(
        "--output-device", "-o", metavar="INDEX_OR_NAME", help="Output for --test (default: the system's).")] = None,
) -> None:
    """List the sound devices PortAudio can open, with their own sample rates and channels.

    Devices are chosen by index or by part of their name (--input-device/--output-device of
    `moshi chat`). Audio is converted to and from 24 kHz mono, so any rate works. A sound server
    (PulseAudio, PipeWire) appears as ALSA devices such as "pulse" or "default".
    """
    from audio.devices import list_devices, loopback_test
    from audio.errors import DeviceError

    found = list_devices()
    if not found:
        raise DeviceError("PortAudio sees no sound device: is a sound server running, or a sound card present?")
    typer.echo(f"{'':2}{'#':>3}  {'in':>3} {'out':>3}  {'rate':>6}  name (host API)")
    for d in found:
        mark = ("<" if d.default_input else " ") + (">" if d.default_output else " ")
        typer.echo(f"{mark}{d.index:>3}  {d.inputs:>3} {d.outputs:>3}  {d.rate:>6}  {d.name} ({d.host_api})")
    typer.echo("< default input   > default output")
    if not test:
        return
    result = loopback_test(input_device, output_device)
    typer.echo(f"\nPlayed a chirp and a 1 kHz tone on {result.output.describe()} at {result.rate} Hz;")
    typer.echo(f"the input {result.input.describe()} heard:")
    if result.delay_ms is None:
        typer.echo(f"  nothing above its background ({result.heard_db:.1f} dBFS): the microphone does not hear the "
                   "speaker (headphones, muted, or another room). Fine with headphones; else check the volume.")
    else:
        typer.echo(f"  the tone at {result.heard_db:.1f} dBFS, strongest at {result.tone_hz:.0f} Hz")
        typer.echo(f"  round trip {result.delay_ms:.1f} ms measured "
                   f"({result.reported_ms:.1f} ms from the stream timestamps)")
    if result.glitches:
        typer.echo(f"  {result.glitches} PortAudio over/underflows: the device may need a larger latency")
