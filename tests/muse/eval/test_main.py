"""The ``muse-eval`` dispatcher."""

from muse.eval.__main__ import TOOLS, main


def test_help_exits_0_and_lists_the_tools(capsys):
    # `muse-eval --help` used to print the usage to stderr and exit 2, like an error.
    for flag in ("--help", "-h"):
        assert main([flag]) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: muse-eval") and all(f"  {tool}" in out for tool in TOOLS)


def test_no_or_an_unknown_tool_is_an_error(capsys):
    assert main([]) == 2
    assert main(["reconstrukt"]) == 2
    assert "unknown tool 'reconstrukt'" in capsys.readouterr().err
