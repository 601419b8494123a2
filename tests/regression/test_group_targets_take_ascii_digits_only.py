"""``group:N`` takes ASCII digits only.

Before, a group number in other scripts' digits (``group:٣``, full-width
``group:８``) was read as a group: text that no admin or tool writes reached
the rules and the logs as another number.  ``group:²`` (a digit to
`str.isdigit`, not to `int`) must be InvalidArgument too."""

import pytest

from vfiod.errors import InvalidArgument
from vfiod.policy import parse_target


@pytest.mark.parametrize("target", ["group:²", "group:٣", "group:８", "group:8\u0663", "group:߀", "group:𝟠"])
def test_unicode_digits_are_not_a_group(target):
    with pytest.raises(InvalidArgument):
        parse_target(target)


def test_ascii_groups_still_parse():
    assert parse_target("group:8") == ("group", 8)
