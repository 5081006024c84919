"""benchmarks.session_counts: reading `strace -c`'s table (a pure function)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is no package

from benchmarks.session_counts import strace_counts, strace_table

# as strace 6.1 (Debian 12) writes it; the errors column is empty for most calls
SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 19.31    0.017706           6      2591           getpid
  9.45    0.008663           7      1191       391 recvfrom
  0.00    0.000000           0         1           brk
------ ----------- ----------- --------- --------- ----------------
100.00    0.091701           9      9591       804 total
"""


def test_calls_are_the_fourth_number_with_or_without_errors(tmp_path):
    path = tmp_path / "strace.first"
    path.write_text(SUMMARY)
    assert strace_counts(path) == {"getpid": 2591, "recvfrom": 1191, "brk": 1}


def test_table_gives_calls_per_session_most_called_first():
    table = strace_table({"first": {"getpid": 40, "brk": 4}, "listed": {"brk": 2}}, 4, 5)
    assert table.splitlines()[2:] == ["| all | 11.0 | 0.5 |", "| getpid | 10.00 | 0.00 |",
                                      "| brk | 1.00 | 0.50 |"]
