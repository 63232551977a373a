"""Widgets for config fields, and configs back from widget values.

Labels, help (`info=`), ranges and defaults come from the config dataclasses (`config.knob` metadata), so a
range lives in one place; the layout stays hand-written in each tab. A `Form` remembers which component
edits which field, adapts handlers to take values by field name, and builds the frozen config.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import gradio as gr

from ..config import field_help, field_range, field_spec
from ..errors import ConfigError


def widget(cls: type, name: str, label: str, *, slider: bool = False, **kw: Any) -> gr.components.Component:
    """A component for field `name` of config class `cls`: checkbox, dropdown (enums), slider/number, textbox.

    A bool `value=` gives a checkbox whatever the field's kind (the Generate panel's compile box: on/off).
    """
    spec = field_spec(cls, name)
    default = kw.pop("value", spec.shown_default)
    kw.setdefault("info", field_help(cls, name))
    lo, hi = field_range(cls, name)
    if isinstance(default, bool):
        return gr.Checkbox(value=default, label=label, **kw)
    if spec.kind == "choice":
        return _choice_checked_by_config(gr.Dropdown(list(spec.choices), value=default, label=label, **kw))
    if spec.kind in ("int", "float"):
        step = 1 if spec.kind == "int" else kw.pop("step", 0.1)
        if slider and lo is not None and hi is not None:
            return _range_checked_by_config(gr.Slider(lo, hi, value=default, step=kw.pop("step", step), label=label, **kw))
        return _range_checked_by_config(gr.Number(value=default, label=label, minimum=lo, maximum=hi,
                                                  precision=0 if spec.kind == "int" else None, **kw))
    return gr.Textbox(value=default, label=label, **kw)


def _range_checked_by_config(component: gr.components.Component) -> gr.components.Component:
    """Keep the browser's range hints but leave the check to the config, whose message names the field.

    Gradio's own check answers an API client with "Value 0 is less than minimum value 1." (no field) and
    logs a traceback; out-of-range values reach `Form.config` instead, which says which setting to change.
    """
    component.preprocess = lambda payload: gr.Number.round_to_precision(payload, component.precision) if (
        isinstance(payload, (int, float)) and not isinstance(payload, bool)) else payload  # text: `_coerce` names it
    return component


def _choice_checked_by_config(component: gr.components.Component) -> gr.components.Component:
    """The same for a dropdown: Gradio's "Value: x is not in the list of choices" names no field and logs a
    traceback; the config's check names the field and lists the choices."""
    if isinstance(component, gr.Dropdown) and not component.allow_custom_value and not component.multiselect:
        component.preprocess = lambda payload: payload
    return component


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Widget value → field type (Sliders send floats, an emptied Number sends None)."""
    kind = field_spec(cls, name).kind
    if kind == "bool":
        return bool(value)
    if kind == "choice":  # the config's __post_init__ turns the value (or a checkbox's bool) into the Enum
        return value
    if kind in ("int", "float"):
        if value is None or value == "":
            raise ConfigError(f"{name} is empty: enter a number.")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(str(value).strip())
            except ValueError:
                raise ConfigError(f"{name} is {str(value)[:40]!r}; enter a number.") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{name} is {value}; enter a finite number.")
        if kind == "int" and float(value) != int(value):
            raise ConfigError(f"{name} is {value}; it must be a whole number.")
        return int(value) if kind == "int" else float(value)
    return "" if value is None else str(value)


class Form:
    """Components keyed by config field name; handlers get `{field: value}` and build the config from it."""

    def __init__(self, cls: type, prefix: str) -> None:
        self.cls = cls
        self.prefix = prefix  # widgets get elem_id "tinv-<prefix>-<field>" (stable hooks for CSS and browser tests)
        self.components: dict[str, gr.components.Component] = {}

    def add(self, name: str, label: str, **kw: Any) -> gr.components.Component:
        """Build and register the widget for field `name` (see `widget`)."""
        component = widget(self.cls, name, label, elem_id=f"tinv-{self.prefix}-{name}", **kw)
        self.components[name] = component
        return component

    def register(self, name: str, component: gr.components.Component) -> gr.components.Component:
        """Register a hand-built component as the editor of field `name`."""
        component.elem_id = component.elem_id or f"tinv-{self.prefix}-{name}"
        self.components[name] = _choice_checked_by_config(component)
        return component

    @property
    def inputs(self) -> list[gr.components.Component]:
        """The components, in the order `handler` expects them."""
        return list(self.components.values())

    def handler(self, fn: Callable[[dict[str, Any]], Any]) -> Callable:
        """Adapt `fn(values_by_field_name)` to a Gradio handler over `inputs`.

        The adapter's signature names the fields, so the API (`gradio_client`) takes them as keyword
        arguments (`name=..., num_vectors=...`) instead of `param_0, param_1, ...`.
        """
        names = list(self.components)
        signature = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
        if inspect.isgeneratorfunction(fn):

            def gen_handler(*values: Any):
                yield from fn(dict(zip(names, values)))

            handler = gen_handler
        else:

            def handler(*values: Any) -> Any:
                return fn(dict(zip(names, values)))

        handler.__signature__ = signature  # type: ignore[attr-defined]
        handler.__name__ = fn.__name__
        return handler

    def config(self, values: dict[str, Any], **overrides: Any) -> Any:
        """The config dataclass from field-name → widget value (validation errors are `ConfigError`s).

        A message that starts with a field's name gets the widget's label in front ("Max steps: max_steps
        is 0; ..."), so both the page's reader and an API client know which setting is meant.
        """
        try:
            coerced = {name: _coerce(self.cls, name, values[name]) for name in self.components}
            return self.cls(**{**coerced, **overrides})
        except ConfigError as e:
            raise ConfigError(self.labelled(str(e))) from None

    def labelled(self, message: str) -> str:
        """`message` with the label of the field it starts with (if any) in front."""
        for name, component in self.components.items():
            label = getattr(component, "label", None)
            if label and message.startswith((f"{name} ", f"{name}:")):
                return f"{label}: {message}"
        return message
