"""The README agrees with the code: its table of config keys lists exactly the schema's keys."""

import re

from tunelab.config.schema import public_fields
from helpers import REPO

README = REPO / "README.md"


def readme_config_keys() -> set[str]:
    """The keys named in the README's `| group | keys |` table, leaving out what parentheses say about them
    (allowed values such as `nf4`)."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| group | keys |"):]
    table = table[:table.index("\n\n")]
    keys = set()
    for row in table.splitlines()[2:]:
        cell = row.split("|")[2]
        while re.search(r"\([^()]*\)", cell):
            cell = re.sub(r"\([^()]*\)", "", cell)
        keys |= set(re.findall(r"`([a-z0-9_]+)`", cell))
    return keys


def test_readme_key_table_lists_every_schema_key_and_no_other():
    schema = {f.name for f in public_fields()}
    listed = readme_config_keys()
    assert not schema - listed, f"add to the README's key table: {sorted(schema - listed)}"
    assert not listed - schema, f"the README's key table names keys the schema lacks: {sorted(listed - schema)}"
