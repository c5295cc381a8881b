"""The spawn form of :class:`~gpulane.hub.spawner.GpulaneSpawner`, as HTML.

One radio button per profile the user's groups allow, then the custom profile's
fields. Every text is HTML-escaped; what is posted back is checked again by
:func:`gpulane.profiles.resolve_form`. (KubeSpawner draws its own form from the
``profile_list`` that :mod:`gpulane.hub.kube` builds.)
"""

from __future__ import annotations

import html

from gpulane.profiles import (
    CUSTOM_SLUG,
    IMAGE_FORMS,
    IMAGE_PATTERN,
    CustomChoices,
    Profile,
    ProfileSet,
    describe_memory,
    describe_profile,
    format_cpus,
    format_memory,
    gpu_choice_key,
    gpu_choice_label,
)


def options_form_html(
    profiles: list[Profile], custom: CustomChoices | None, pset: ProfileSet | None = None
) -> str:
    """The spawn form: one radio button per profile, then the custom profile's fields.

    Every text is HTML-escaped; the posted form is checked again by :func:`resolve_form`.
    """
    esc = html.escape
    if not profiles and custom is None:
        return "<p>No server profile is open to your groups; ask an admin for access.</p>"
    lines = ['<div class="gpulane-profiles">']
    for index, profile in enumerate(profiles):
        checked = " checked" if index == 0 else ""
        lines.append(
            f'<div class="radio"><label><input type="radio" name="profile" '
            f'value="{esc(profile.slug)}"{checked}> <strong>{esc(profile.display_name)}</strong>'
            f" <small>{esc(describe_profile(profile, pset))}</small>"
            + (f"<br><span>{esc(profile.description)}</span>" if profile.description else "")
            + "</label></div>"
        )
    if custom is not None:
        checked = "" if profiles else " checked"
        lines.append(
            f'<div class="radio"><label><input type="radio" name="profile" value="{CUSTOM_SLUG}"'
            f"{checked}> <strong>{esc(custom.display_name)}</strong>"
            + (f"<br><span>{esc(custom.description)}</span>" if custom.description else "")
            + "</label></div>"
        )
        lines.append('<fieldset class="gpulane-custom">')
        if custom.free_image:
            lines.append(
                '<label>Image <input class="form-control" name="image" list="gpulane-images" '
                f'pattern="{esc(IMAGE_PATTERN)}" title="{esc(IMAGE_FORMS)}" '
                f'placeholder="registry/name:tag" value="{esc(custom.images[0]) if custom.images else ""}">'
                "</label>"
            )
            lines.append(
                '<datalist id="gpulane-images">'
                + "".join(f'<option value="{esc(i)}">' for i in custom.images)
                + "</datalist>"
            )
        elif custom.images:
            lines.append(_select("image", "Image", [(i, i) for i in custom.images]))
        if custom.gpu_options != ((0, 0),):
            lines.append(
                _select(
                    "gpu",
                    "GPU",
                    [(gpu_choice_key(*c), gpu_choice_label(*c, pset)) for c in custom.gpu_options],
                )
            )
        lines.append(
            _select("cpus", "CPUs", [(format_cpus(c), format_cpus(c)) for c in custom.cpus])
        )
        lines.append(
            _select(
                "memory", "Memory", [(format_memory(m), describe_memory(m)) for m in custom.memory]
            )
        )
        lines.append("</fieldset>")
    lines.append("</div>")
    return "\n".join(lines)


def _select(name: str, label: str, options: list[tuple[str, str]]) -> str:
    esc = html.escape
    items = "".join(f'<option value="{esc(value)}">{esc(text)}</option>' for value, text in options)
    return f'<label>{esc(label)} <select class="form-control" name="{esc(name)}">{items}</select></label>'
