from datetime import UTC, datetime

import pytest

from pagecast.audience import read_contacts, read_recipients, recipients_from_psids
from pagecast.errors import InvalidAudience


def _write(tmp_path, name, content, mode="w"):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def test_plain_file_one_psid_a_line(tmp_path):
    path = _write(tmp_path, "r.txt", "# audience\n1001\n\n  1002  \n1003\n")
    parsed = read_recipients(path)
    assert [r.psid for r in parsed] == ["1001", "1002", "1003"]


def test_csv_with_psid_and_names(tmp_path):
    path = _write(tmp_path, "r.csv", "PSID,First_Name,last_name,extra\n1001,Ana,Lee,x\n1002,,,y\n")
    parsed = read_recipients(path)
    first, second = parsed
    assert (first.psid, first.first_name, first.last_name) == ("1001", "Ana", "Lee")
    assert (second.first_name, second.last_name) == (None, None)


def test_a_recipients_file_is_read_again_on_each_pass(tmp_path):
    path = _write(tmp_path, "r.txt", "1001\n1002\n1001\n")
    parsed = read_recipients(path)
    assert [r.psid for r in parsed] == [r.psid for r in parsed] == ["1001", "1002", "1001"]


def test_bad_psids_are_reported_with_line_numbers(tmp_path):
    path = _write(tmp_path, "r.txt", "1001\nabc\n1002\n" + "9" * 21 + "\n")
    with pytest.raises(InvalidAudience) as caught:
        read_recipients(path)
    assert [(p.line, p.reason) for p in caught.value.problems] == [
        (2, "PSID 'abc' is not numeric (digits 0-9 only)"),
        (4, "PSID is 21 digits, the limit is 20"),
    ]
    assert "line 2" in str(caught.value) and "line 4" in str(caught.value)


def test_bad_psids_in_csv_report_file_line_numbers(tmp_path):
    path = _write(tmp_path, "r.csv", "psid,first_name\n1001,A\n10x2,B\n")
    with pytest.raises(InvalidAudience) as caught:
        read_recipients(path)
    assert [p.line for p in caught.value.problems] == [3]


def test_missing_file(tmp_path):
    with pytest.raises(InvalidAudience, match="does not exist"):
        read_recipients(tmp_path / "nope.txt")


def test_only_the_first_bad_lines_are_kept_but_all_are_counted(tmp_path):
    path = _write(tmp_path, "r.txt", "x\n" * 500)
    with pytest.raises(InvalidAudience) as caught:
        read_recipients(path)
    assert len(caught.value.problems) == 100 and caught.value.problem_count == 500
    assert "has 500 invalid PSID(s)" in str(caught.value) and "… and 480 more" in str(caught.value)


def test_a_csv_header_after_comment_lines_keeps_file_line_numbers(tmp_path):
    path = _write(tmp_path, "r.csv", "# export\n\npsid;first_name\n1001;A\nx;B\n")
    with pytest.raises(InvalidAudience) as caught:
        read_recipients(path)
    assert [p.line for p in caught.value.problems] == [5]


def test_csv_with_extra_fields_is_unreadable(tmp_path):
    path = _write(tmp_path, "r.csv", "psid,first_name\n1001,A,surplus\n")
    with pytest.raises(InvalidAudience, match="more fields than the header"):
        read_recipients(path)


@pytest.mark.parametrize("content", ["\n\n# nobody\n", "psid\n"])
def test_empty_audience(tmp_path, content):
    path = _write(tmp_path, "r.txt", content)
    with pytest.raises(InvalidAudience, match="no recipients"):
        read_recipients(path)


def test_inline_psids():
    parsed = recipients_from_psids(["1001", " 1002 ", "", "1001"])
    assert [r.psid for r in parsed] == ["1001", "1002", "1001"]
    with pytest.raises(InvalidAudience) as caught:
        recipients_from_psids(["1001", "x"])
    assert caught.value.problems[0].line == 2


def test_contacts_file(tmp_path):
    path = _write(
        tmp_path,
        "c.csv",
        "psid,first_name,last_name,tags,opted_out,last_interaction_at\n"
        "1001,Ana,Lee,vip;promo,false,2026-11-20T10:00:00Z\n"
        "1002,Bo,,promo,yes,\n"
        "1001,Ana,Lee,vip|late,0,2026-11-21T10:00:00\n",
    )
    contacts = {c.psid: c for c in read_contacts(path)}
    assert contacts["1001"].tags == ("vip", "late")
    assert contacts["1001"].last_interaction_at == datetime(2026, 11, 21, 10, tzinfo=UTC)
    assert contacts["1002"].opted_out is True
    assert contacts["1002"].last_interaction_at is None


def test_contacts_file_problems_are_reported_by_line(tmp_path):
    path = _write(
        tmp_path,
        "c.csv",
        "psid,opted_out,last_interaction_at\n1001,maybe,\n1002,no,yesterday\nabc,no,\n",
    )
    with pytest.raises(InvalidAudience) as caught:
        read_contacts(path)
    assert [p.line for p in caught.value.problems] == [2, 3, 4]
