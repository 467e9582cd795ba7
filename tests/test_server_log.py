"""server_log on moshi.server's real output (captured from runs of the tiny model), and the relay."""

from __future__ import annotations

import statistics

from jmoshi_cli import render
from jmoshi_cli.serving.child import explain_exit
from jmoshi_cli.serving.server_log import Event, FrameStats, Kind, ServerLog, frame_ms, plain

# --- text captured from real runs of moshi 0.2.2 / aiohttp 3.11 -----------------------------------------

# `jmoshi serve --device cpu` on the tiny model: start-up, a conversation, then a browser that
# hung up while the server was still sending (the next browser's `accepted connection` comes first).
SERVING = (
    '\x1b[1;34m[Info]\x1b[0m retrieving checkpoint\n',
    '\x1b[1;34m[Info]\x1b[0m loading mimi\n',
    '\x1b[1;34m[Info]\x1b[0m mimi loaded\n',
    '\x1b[1;34m[Info]\x1b[0m loading moshi\n',
    '\x1b[1;34m[Info]\x1b[0m moshi loaded\n',
    '\x1b[1;34m[Info]\x1b[0m warming up the model\n',
    ('The installed version of bitsandbytes was compiled without GPU support. 8-bit optimizers, 8-bit '
     'multiplication, and GPU quantization are unavailable.\n'),
    '\x1b[1;34m[Info]\x1b[0m serving static content from /tmp/tmpwskzdqi7/dist\n',
    '\x1b[1;34m[Info]\x1b[0m Access the Web UI directly at http://127.0.0.1:34073\n',
    '======== Running on http://127.0.0.1:34073 ========\n',
    '(Press CTRL+C to quit)\n',
    '\x1b[1;34m[Info]\x1b[0m accepted connection\n',
    '\x1b[1;34m[Info]\x1b[0m frame handled in 93.1ms\n',
    "\x1b[1;34m[Info]\x1b[0m text token 'すか'\n",
    '\x1b[1;34m[Info]\x1b[0m frame handled in 150.6ms\n',
    "\x1b[1;34m[Info]\x1b[0m text token 'う'\n",
    '\x1b[1;34m[Info]\x1b[0m frame handled in 163.1ms\n',
    "\x1b[1;34m[Info]\x1b[0m text token '眠'\n",
    '\x1b[1;34m[Info]\x1b[0m frame handled in 148.5ms\n',
    "\x1b[1;34m[Info]\x1b[0m text token '本'\n",
    '\x1b[1;34m[Info]\x1b[0m frame handled in 217.1ms\n',
    "\x1b[1;34m[Info]\x1b[0m text token 'もし'\n",
    '\x1b[1;34m[Info]\x1b[0m frame handled in 704.5ms\n',
    "\x1b[1;34m[Info]\x1b[0m text token '当'\n",
    '\x1b[1;34m[Info]\x1b[0m frame handled in 268.5ms\n',
    "\x1b[1;34m[Info]\x1b[0m text token 'ですね'\n",
    '\x1b[1;34m[Info]\x1b[0m frame handled in 1369.8ms\n',
    '\x1b[1;34m[Info]\x1b[0m connection closed\n',
    "\x1b[1;34m[Info]\x1b[0m text token 'み'\n",
    '\x1b[1;34m[Info]\x1b[0m accepted connection\n',
    'Error handling request from 127.0.0.1\n',
    'Traceback (most recent call last):\n',
    '  File "/work/main/.venv/lib/python3.11/site-packages/aiohttp/web_protocol.py", line 510, in _handle_request\n',
    '    resp = await request_handler(request)\n',
    '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n',
    '  File "/work/main/.venv/lib/python3.11/site-packages/aiohttp/web_app.py", line 569, in _handle\n',
    '    return await handler(request)\n',
    '           ^^^^^^^^^^^^^^^^^^^^^^\n',
    '  File "/work/main/.venv/lib/python3.11/site-packages/moshi/server.py", line 172, in handle_chat\n',
    '    await asyncio.gather(opus_loop(), recv_loop(), send_loop())\n',
    '  File "/work/main/.venv/lib/python3.11/site-packages/moshi/server.py", line 151, in opus_loop\n',
    '    await ws.send_bytes(msg)\n',
    '  File "/work/main/.venv/lib/python3.11/site-packages/aiohttp/web_ws.py", line 422, in send_bytes\n',
    '    await self._writer.send_frame(data, WSMsgType.BINARY, compress=compress)\n',
    '  File "/work/main/.venv/lib/python3.11/site-packages/aiohttp/_websocket/writer.py", line 73, in send_frame\n',
    '    raise ClientConnectionResetError("Cannot write to closing transport")\n',
    'aiohttp.client_exceptions.ClientConnectionResetError: Cannot write to closing transport\n',
    '\x1b[1;34m[Info]\x1b[0m frame handled in 1229.8ms\n',
)


# --moshi-weight pointing at an empty safetensors file (its longest line shortened).
BAD_WEIGHT = (
    '\x1b[1;34m[Info]\x1b[0m retrieving checkpoint\n',
    '\x1b[1;34m[Info]\x1b[0m loading mimi\n',
    '\x1b[1;34m[Info]\x1b[0m mimi loaded\n',
    '\x1b[1;34m[Info]\x1b[0m loading moshi\n',
    'Traceback (most recent call last):\n',
    '  File "<frozen runpy>", line 198, in _run_module_as_main\n',
    '  File "<frozen runpy>", line 88, in _run_code\n',
    '  File "/work/main/src/jmoshi_cli/moshi_child.py", line 66, in <module>\n',
    '    main()\n',
    '  File "/work/main/src/jmoshi_cli/moshi_child.py", line 62, in main\n',
    '    runpy.run_module("moshi.server", run_name="__main__", alter_sys=True)\n',
    '  File "<frozen runpy>", line 226, in run_module\n',
    '  File "<frozen runpy>", line 98, in _run_module_code\n',
    '  File "<frozen runpy>", line 88, in _run_code\n',
    '  File "/work/main/.venv/lib/python3.11/site-packages/moshi/server.py", line 284, in <module>\n',
    '    main()\n',
    '  File "/work/main/.venv/lib/python3.11/site-packages/moshi/server.py", line 233, in main\n',
    '    lm = checkpoint_info.get_moshi(device=args.device, dtype=args.dtype)\n',
    '         ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n',
    '  File "/work/main/.venv/lib/python3.11/site-packages/moshi/models/loaders.py", line 217, in get_moshi\n',
    '    model = get_moshi_lm(\n',
    '            ^^^^^^^^^^^^^\n',
    '  File "/work/main/.venv/lib/python3.11/site-packages/moshi/models/loaders.py", line 291, in get_moshi_lm\n',
    '    load_model(model, filename, strict=strict)\n',
    '  File "/work/main/.venv/lib/python3.11/site-packages/safetensors/torch.py", line 221, in load_model\n',
    '    raise RuntimeError(error)\n',
    'RuntimeError: Error(s) in loading state_dict for LMModel:\n',
    ('    Missing key(s) in state_dict: "depformer.layers.0.gating.0.linear_in.weight", '
     '"depformer.layers.0.gating.0.linear_out.weight", "depformer.layers.0.gating.1.linear_in.weight", '
     '"depformer.layers.0.g (...)\n'),
)


# A repo without config.json, like J-Moshi's (moshi warns, then assumes its 7B config).
NO_CONFIG = (
    '\x1b[1;34m[Info]\x1b[0m retrieving checkpoint\n',
    ('/work/main/.venv/lib/python3.11/site-packages/moshi/models/loaders.py:169: UserWarning: Repository '
     'nu-dialogue/j-moshi contains no config.json. Assuming this is a Moshi 7B. Support for such '
     'repository might be removed in the future.\n'),
    '  warnings.warn(f"Repository {hf_repo} contains no config.json. "\n',
    '\x1b[1;34m[Info]\x1b[0m loading mimi\n',
    '\x1b[1;34m[Info]\x1b[0m mimi loaded\n',
    '\x1b[1;34m[Info]\x1b[0m loading moshi\n',
)


# The port taken by another program while the model loaded (stderr only).
PORT_TAKEN = (
    'Traceback (most recent call last):\n',
    '  File "<frozen runpy>", line 198, in _run_module_as_main\n',
    '  File "<frozen runpy>", line 88, in _run_code\n',
    '  File "/work/main/src/jmoshi_cli/moshi_child.py", line 66, in <module>\n',
    '    main()\n',
    '  File "/work/main/src/jmoshi_cli/moshi_child.py", line 62, in main\n',
    '    runpy.run_module("moshi.server", run_name="__main__", alter_sys=True)\n',
    '  File "<frozen runpy>", line 226, in run_module\n',
    '  File "<frozen runpy>", line 98, in _run_module_code\n',
    '  File "<frozen runpy>", line 88, in _run_code\n',
    '  File "/work/main/.venv/lib/python3.11/site-packages/moshi/server.py", line 284, in <module>\n',
    '    main()\n',
    '  File "/work/main/.venv/lib/python3.11/site-packages/moshi/server.py", line 280, in main\n',
    '    web.run_app(app, port=args.port, ssl_context=ssl_context)\n',
    '  File "/work/main/src/jmoshi_cli/moshi_child.py", line 30, in run_app_on_host\n',
    '    return run_app(app, *args, **kwargs)\n',
    '           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n',
    '  File "/work/main/.venv/lib/python3.11/site-packages/aiohttp/web.py", line 530, in run_app\n',
    '    loop.run_until_complete(main_task)\n',
    '  File "/root/.pyenv/versions/3.11.7/lib/python3.11/asyncio/base_events.py", line 653, in run_until_complete\n',
    '    return future.result()\n',
    '           ^^^^^^^^^^^^^^^\n',
    "OSError: [Errno 98] error while attempting to bind on address ('127.0.0.1', 40333): address already in use\n",
)


def feed(lines, step_s: float = 0.1) -> list[Event]:
    log, events = ServerLog(), []
    for i, line in enumerate(lines):
        events += log.feed(line, i * step_s)
    return events + log.feed("", len(lines) * step_s)


def kinds(events: list[Event]) -> list[Kind]:
    return [event.kind for event in events]


def shown_lines(events: list[Event]) -> list[str]:
    return [line for event in events for line in event.text.split("\n")]


def test_start_up_shows_upstream_steps_and_leaves_out_known_noise():
    events = feed(SERVING[:12])
    steps = [event.text for event in events if event.kind is Kind.STEP]
    assert steps == ["retrieving checkpoint", "loading mimi", "mimi loaded", "loading moshi", "moshi loaded",
                     "warming up the model", "serving static content from /tmp/tmpwskzdqi7/dist"]
    quiet = " ".join(event.text for event in events if event.kind is Kind.QUIET)
    assert "bitsandbytes" in quiet and "Running on" in quiet and "CTRL+C" in quiet and "Access the Web UI" in quiet
    assert Kind.OTHER not in kinds(events) and Kind.TRACEBACK not in kinds(events)


def test_a_browser_hanging_up_mid_send_is_one_event_and_ends_the_conversation():
    events = feed(SERVING)
    assert kinds(events).count(Kind.HUNG_UP) == 1
    assert Kind.TRACEBACK not in kinds(events) and Kind.OTHER not in kinds(events)
    assert not any("ClientConnectionResetError" in event.text for event in events if event.kind is not Kind.HUNG_UP)
    hung_up = kinds(events).index(Kind.HUNG_UP)
    summary = events[hung_up + 1]
    times = [frame_ms(line) for line in SERVING[:SERVING.index('Error handling request from 127.0.0.1\n')]]
    times = [ms for ms in times if ms is not None]
    assert summary.stats == FrameStats(len(times), statistics.median(times), max(times), final=True)
    assert not summary.stats.real_time  # the tiny model on this CPU: 93 to 1370 ms per 80 ms frame
    # The frame after the traceback belongs to the next browser, whose conversation ends with the output.
    assert events[-1].stats == FrameStats(1, 1229.8, 1229.8, final=True)


def test_the_same_traceback_without_aiohttp_request_header_stays_whole():
    start = SERVING.index("Traceback (most recent call last):\n")
    events = feed(SERVING[start:])
    assert kinds(events) == [Kind.TRACEBACK, Kind.FRAMES]
    assert events[0].text == "".join(SERVING[start:-1]).rstrip("\n")


def test_any_other_request_error_keeps_its_whole_traceback():
    start = SERVING.index('Error handling request from 127.0.0.1\n')
    block = [*SERVING[start:-2], "RuntimeError: something else broke\n"]
    events = feed(block)
    assert kinds(events) == [Kind.TRACEBACK]
    assert events[0].text == "".join(block).rstrip("\n")


def test_a_hang_up_that_turns_out_to_be_a_chained_cause_is_shown_whole():
    start = SERVING.index('Error handling request from 127.0.0.1\n')
    cause = SERVING[start:-1]
    chained = ["\n", "During handling of the above exception, another exception occurred:\n", "\n",
               "Traceback (most recent call last):\n", '  File "x.py", line 1, in f\n', "ValueError: later\n"]
    events = feed([*cause, *chained])
    assert kinds(events) == [Kind.HUNG_UP, Kind.TRACEBACK, Kind.OTHER, Kind.TRACEBACK]
    assert shown_lines(events[1:]) == [line.rstrip("\n") for line in [*cause, *chained]]


def test_a_load_failure_traceback_comes_through_line_for_line():
    events = feed(BAD_WEIGHT)
    assert kinds(events) == [Kind.STEP] * 4 + [Kind.TRACEBACK, Kind.OTHER]
    assert shown_lines(events[4:]) == [plain(line) for line in BAD_WEIGHT[4:]]


def test_moshi_7b_config_warning_for_a_repo_without_config_json_is_quiet():
    events = feed(NO_CONFIG)
    assert kinds(events) == [Kind.STEP, Kind.QUIET, Kind.QUIET, Kind.STEP, Kind.STEP, Kind.STEP]


def test_an_unknown_warning_is_shown():
    events = feed(["/x/torch/nn.py:12: FutureWarning: something will change\n", "  warnings.warn(\n"])
    assert kinds(events) == [Kind.OTHER, Kind.OTHER]


def test_frames_are_summarised_every_ten_seconds_and_at_the_end():
    log = ServerLog()
    line = "\x1b[1;34m[Info]\x1b[0m frame handled in {}ms\n"
    events = [event for i in range(260) for event in log.feed(line.format(40 + i % 10 * 10), i * 0.08)]
    periodic = [event.stats for event in events]
    assert [stats.final for stats in periodic] == [False, False]
    assert periodic[0].frames == 126 and periodic[0].median_ms == 80.0 and periodic[0].p95_ms == 130.0
    done = log.feed("\x1b[1;34m[Info]\x1b[0m done with connection\n", 20.0)
    assert kinds(done) == [Kind.HUNG_UP, Kind.FRAMES]
    assert done[1].stats.frames == 260 and done[1].stats.final


def test_output_ending_mid_traceback_shows_what_came():
    events = feed(BAD_WEIGHT[:9])
    assert events[-1] == Event(Kind.TRACEBACK, "\n".join(plain(line) for line in BAD_WEIGHT[4:9]))


def test_explain_exit_reads_the_real_failures():
    taken = explain_exit(1, [line.rstrip("\n") for line in PORT_TAKEN])
    assert "the port was taken while the model loaded" in taken.message and taken.exit_code == 1
    unknown = explain_exit(-9, [line.rstrip("\n") for line in BAD_WEIGHT[:-1]])
    assert unknown.message == ("moshi.server exited with code 137: "
                               "RuntimeError: Error(s) in loading state_dict for LMModel:")
    assert "--verbose" in unknown.hint


# --- what a person sees -----------------------------------------------------------------------------------


def test_relay_shows_one_line_for_a_hang_up_and_a_summary(capsys):
    relay = render.server_relay(verbose=False)
    for line in [*SERVING, ""]:
        relay(line)
    err = capsys.readouterr().err
    assert err.count("the browser hung up") == 1 and "Traceback" not in err and "bitsandbytes" not in err
    assert "moshi.server: loading moshi" in err and "\x1b[" not in err
    assert "conversation over: 8 frames, median 190 ms, p95 1370 ms per 80 ms frame: slower than real time" in err
    assert "frame handled" not in err and "text token" not in err


def test_relay_names_the_server_that_spoke(capsys):
    """The MLX backend's child reports the same steps: they carry its name, not moshi.server's."""
    relay = render.server_relay(verbose=False, server="jmoshi's MLX server")
    for line in SERVING:
        relay(line)
    err = capsys.readouterr().err
    assert "jmoshi's MLX server: loading moshi" in err and "moshi.server:" not in err


def test_relay_keeps_a_failure_traceback(capsys):
    relay = render.server_relay(verbose=False)
    for line in [*BAD_WEIGHT, ""]:
        relay(line)
    err = capsys.readouterr().err
    assert "".join(plain(line) + "\n" for line in BAD_WEIGHT[4:]) in err


def test_verbose_relay_is_the_raw_output(capsys):
    relay = render.server_relay(verbose=True)
    for line in [*SERVING, ""]:
        relay(line)
    assert capsys.readouterr().err == "".join(SERVING)
