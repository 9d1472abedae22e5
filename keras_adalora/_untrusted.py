"""Values read from files that come from other people.

Adapter files (`load_adapter`), PEFT adapter folders (`import_peft`) and the
adaptation record in a `.keras` file (`keras.saving.load_model`) are read
through a `Source`: every value is checked as it is read (a rank that is a
string, a list where an object belongs, a negative size, an infinite
number) and every tensor for its dtype and finiteness, with an error that
names the file and the entry at fault and says what to do. The loaders
check all of it, and the shapes against the model, before they change
anything.

Example:

>>> source = Source("Adapter file 'a.adalora.h5'", "Save it again.")
>>> source.get({"init_rank": "4"}, "init_rank", "metadata", source.integer)
Traceback (most recent call last):
...
ValueError: Adapter file 'a.adalora.h5' is damaged or was edited: \
metadata['init_rank'] must be an integer >= 0; it is '4'. Save it again.
"""

import json
import math
import reprlib

import numpy as np

from keras_adalora._validation import is_int

_REQUIRED = object()
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = 4


def short(value):
    """`repr(value)`, cut short: a value quoted in an error may come from a
    hostile file (a list of millions)."""
    return _SHORT.repr(value)


class Source:
    """Where untrusted values come from, and what the user can do when one
    is wrong.

    Args:
        name: the source as errors name it, e.g. `"Adapter file '...'"`.
        fix: the sentence that ends every error (what to do instead).
    """

    def __init__(self, name, fix):
        self.name = name
        self.fix = fix

    def damaged(self, problem):
        """A `ValueError`: the source holds something it cannot hold."""
        return ValueError(
            f"{self.name} is damaged or was edited: {problem}. {self.fix}"
        )

    def unreadable(self, error):
        """A `ValueError` for a source its parser could not read (`error`:
        what the parser raised)."""
        return ValueError(
            f"{self.name} could not be read (it is truncated, damaged or "
            f"not that kind of file): {error}. {self.fix}"
        )

    def parse_json(self, text, where):
        """`text` (a str, or UTF-8 bytes) parsed as JSON."""
        try:
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            return json.loads(text)
        except (ValueError, RecursionError) as error:
            # `ValueError` covers bad UTF-8 and bad JSON; `RecursionError`
            # lists nested thousands deep.
            raise self.damaged(f"{where} is not valid JSON ({error})") from None

    def get(self, entry, key, where, check, default=_REQUIRED, **bounds):
        """`entry[key]`, passed through `check` (one of the methods below,
        with `bounds`); `default` if the key is absent (an error where no
        default is given). `where` names `entry` in errors."""
        if key not in entry:
            if default is _REQUIRED:
                raise self.damaged(f"{where} has no '{key}'")
            return default
        return check(entry[key], f"{where}['{key}']", **bounds)

    def _wrong(self, value, where, expected):
        return self.damaged(
            f"{where} must be {expected}; it is {short(value)}"
        )

    def mapping(self, value, where):
        if not isinstance(value, dict):
            raise self._wrong(value, where, "a JSON object")
        return value

    def sequence(self, value, where):
        if not isinstance(value, list):
            raise self._wrong(value, where, "a list")
        return value

    def text(self, value, where):
        if not isinstance(value, str):
            raise self._wrong(value, where, "a string")
        return value

    def choice(self, value, where, choices):
        if not isinstance(value, str) or value not in choices:
            raise self._wrong(value, where, f"one of {list(choices)}")
        return value

    def flag(self, value, where):
        if not isinstance(value, bool):
            raise self._wrong(value, where, "true or false")
        return value

    def integer(self, value, where, minimum=0):
        if not is_int(value) or value < minimum:
            raise self._wrong(value, where, f"an integer >= {minimum}")
        return int(value)

    def number(self, value, where, optional=False):
        """A finite number (None too if `optional`), as a float."""
        if value is None and optional:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                if math.isfinite(value):
                    return float(value)
            except OverflowError:  # an integer too large for a float
                pass
        expected = "a finite number" + (" or null" if optional else "")
        raise self._wrong(value, where, expected)

    def shape(self, value, where):
        """A tensor shape: a list of integers >= 0."""
        self.sequence(value, where)
        for axis, size in enumerate(value):
            self.integer(size, f"{where}[{axis}]")
        return tuple(value)

    def tensor(self, value, where, kinds="f"):
        """`value` as a NumPy array of one of the dtype `kinds` (floats by
        default), all finite."""
        value = np.asarray(value)
        if value.dtype.kind not in kinds:
            expected = "floating-point numbers" if kinds == "f" else "numbers"
            raise self.damaged(
                f"{where} holds {value.dtype} values, where a weight holds "
                f"{expected}"
            )
        if value.dtype.kind != "f":
            return value
        finite = np.isfinite(value)
        if not finite.all():
            raise self.damaged(
                f"{where} holds {value.size - int(finite.sum())} NaN or "
                "infinite values, which would poison the weights they are "
                "loaded into"
            )
        return value
