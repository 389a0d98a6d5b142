"""docs/guide/configuration-reference.md is generated from fsl_dist/config.py and kept current."""

import dataclasses

from fsl_dist import config_reference
from fsl_dist.config import Config

from launching import ROOT


def test_the_configuration_reference_is_current():
    document = (ROOT / config_reference.OUTPUT).read_text()
    assert document == config_reference.render(), (
        f"{config_reference.OUTPUT} is out of date with fsl_dist/config.py; regenerate it: "
        f"{config_reference.COMMAND}")


def test_every_config_key_and_section_has_a_docstring():
    """A field without the string literal under it would show an empty meaning in the reference."""
    undocumented = []
    for name, cls in config_reference.sections():
        if cls.__doc__ is None or cls.__doc__.startswith(cls.__name__ + "("):
            undocumented.append(f"section {name or 'top level'} ({cls.__name__})")  # dataclass's
        undocumented += [key.dotted for key in config_reference.keys(name, cls) if not key.doc]
    assert not undocumented, ("add a docstring (a string literal on the line after the field) in "
                              f"fsl_dist/config.py for: {', '.join(undocumented)}")


def test_the_reference_lists_every_key_that_config_accepts():
    listed = {key.dotted for name, cls in config_reference.sections()
              for key in config_reference.keys(name, cls)}
    accepted = set()
    for f in dataclasses.fields(Config):
        value = getattr(Config(), f.name)
        if dataclasses.is_dataclass(value):
            accepted |= {f"{f.name}.{sub.name}" for sub in dataclasses.fields(value)}
        else:
            accepted.add(f.name)
    assert listed == accepted
