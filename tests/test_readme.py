"""README promises: its performance table is generated from committed results, and CI runs the
test command it shows."""

import re
from pathlib import Path

from triton_convlstm.apps.bench.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_performance_tables_are_generated_from_committed_results(monkeypatch):
    """Each table (one per card) follows the command that generated it."""
    monkeypatch.chdir(ROOT)  # the table names its files relative to the repository
    commands = re.findall(r"`python -m triton_convlstm bench table ([^`]+)`", README)
    tables = [part.split("<!-- /perf-table -->")[0].strip()
              for part in README.split("<!-- perf-table -->")[1:]]
    assert commands and len(commands) == len(tables), (len(commands), len(tables))
    for command, shown in zip(commands, tables):
        files = [ROOT / p for p in command.split()]
        assert all(f.exists() for f in files), files
        assert shown == markdown_table([f.relative_to(ROOT) for f in files]).strip()


def test_ci_runs_the_readme_test_command():
    assert "bash run.sh demo" in README and "bash run.sh test" in README
    assert "bash run.sh test" in (ROOT / ".ci" / "run").read_text()


def test_the_streaming_example_runs_and_holds(monkeypatch):
    """The README's streaming snippet, run as written; its closing claim checked."""
    import torch

    from triton_convlstm import ConvLSTM

    block = README.split("### Streaming")[1].split("```python")[1].split("```")[0]
    scope = {"torch": torch, "ConvLSTM": ConvLSTM}
    torch.manual_seed(0)
    exec(block, scope)
    video, model = scope["video"], scope["model"]
    whole_outputs, whole_state = model(video)
    chunks = [model(c, hidden_state=s)[0] for c, s in _streamed(model, video)]
    streamed = torch.cat([c[-1] for c in chunks], dim=1)
    torch.testing.assert_close(streamed, whole_outputs[-1], rtol=1e-5, atol=1e-6)
    for (h, c), (hw, cw) in zip(scope["state"], whole_state):
        torch.testing.assert_close(h, hw, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, cw, rtol=1e-5, atol=1e-6)


def _streamed(model, video):
    """(chunk, the state it starts from), as the README's loop feeds them."""
    import torch

    state, pairs = None, []
    for chunk in torch.split(video, 8, dim=1):
        pairs.append((chunk, state))
        _, state = model(chunk, hidden_state=state)
    return pairs


def test_the_circular_padding_example_runs_and_holds():
    """The README's global-grid snippet, run as written; its closing claim checked."""
    import torch

    from triton_convlstm import ConvLSTM

    block = README.split("### Global grids")[1].split("```python")[1].split("```")[0]
    scope = {"torch": torch, "ConvLSTM": ConvLSTM}
    torch.manual_seed(0)
    exec(block, scope)
    model, field, outputs = scope["model"], scope["field"], scope["outputs"]
    shifted = model(torch.roll(field, shifts=7, dims=-1))[0]
    torch.testing.assert_close(shifted[-1], torch.roll(outputs[-1], shifts=7, dims=-1),
                               rtol=1e-4, atol=1e-5)


def _block(heading):
    return README.split(heading)[1].split("```python")[1].split("```")[0]


def test_the_variable_length_example_runs_and_holds():
    """The README's lengths snippet, run as written; its comment's claims checked."""
    import torch

    from triton_convlstm import ConvLSTM

    scope = {"torch": torch, "ConvLSTM": ConvLSTM}
    torch.manual_seed(0)
    exec(_block("### Variable-length batches"), scope)
    model, clips, outputs, states = (scope[k] for k in ("model", "clips", "outputs", "states"))
    assert not outputs[-1][1, 4:].any()
    alone, alone_states = model(clips[1:2, :4])
    torch.testing.assert_close(outputs[-1][1:2, :4], alone[-1], rtol=1e-5, atol=1e-6)
    for mine, ref in zip(states[-1], alone_states[-1]):
        torch.testing.assert_close(mine[1:2], ref, rtol=1e-5, atol=1e-6)


def test_the_dropout_example_runs():
    import torch

    from triton_convlstm import ConvLSTM

    scope = {"torch": torch, "ConvLSTM": ConvLSTM}
    exec(_block("### Dropout"), scope)
    model = scope["model"]
    assert model.dropout == [0.2, 0.2] and model.recurrent_dropout == [0.3, 0.1]
    assert scope["outputs"][0].shape == (2, 6, 32, 16, 16)
