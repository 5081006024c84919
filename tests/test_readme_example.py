"""The README's "Running it in front of Postfix" example, as written: SMTPGATE_NEXT_HOP only,
the shipped Postfix files on their shipped ports (in a network namespace of its own:
services.readme_stack), and a user's message to another domain over 587."""

from __future__ import annotations

import re
import shutil

import pytest
from services.readme_stack import RECIPIENT, run_in_namespace

pytestmark = pytest.mark.slow


def test_a_users_mail_to_another_domain_relays_with_the_readme_settings(service_root):
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed for this test")
    found = run_in_namespace(service_root / "readme-stack")
    assert found["swaks_status"] == 0, found["swaks"]
    assert re.search(r"<~  250 2\.0\.0 Ok: \d+ bytes queued as \w+", found["swaks"]), found["swaks"]
    # the submission next hop by default: Postfix's submission service of the shipped files,
    # which the start-up probe found relaying for an authenticated login
    assert re.search(r"next hop 127\.0\.0\.1:10587: XCLIENT authorized .*; relays for an "
                     r"authenticated login", found["gate_log"]), found["gate_log"]
    assert any(f"to=<{RECIPIENT}>" in line and "status=sent" in line
               for line in found["postfix_lines"]), found["postfix_lines"]
