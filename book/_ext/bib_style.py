"""The bibliography in the style the text cites in: author-year labels ("Shazeer et al., 2017"),
entries sorted by author, year and title (pybtex's ``plain`` order), instead of numbers.

Registered as the pybtex formatting style ``authoryear``; ``_config.yml`` selects it with
``bibtex_default_style: authoryear``.
"""

from pybtex.plugin import register_plugin
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle


def _surname(person) -> str:
    parts = person.prelast_names + person.last_names
    return " ".join(parts).replace("{", "").replace("}", "") or str(person)


class AuthorYearLabels(BaseLabelStyle):
    def format_labels(self, sorted_entries):
        for entry in sorted_entries:
            people = entry.persons.get("author") or entry.persons.get("editor") or []
            year = entry.fields.get("year", "n.d.")
            if not people:
                who = entry.fields.get("title", entry.key)
            elif len(people) == 1:
                who = _surname(people[0])
            elif len(people) == 2:
                who = f"{_surname(people[0])} and {_surname(people[1])}"
            else:
                who = f"{_surname(people[0])} et al."
            yield f"{who}, {year}"


class AuthorYearStyle(PlainStyle):
    default_label_style = AuthorYearLabels


register_plugin("pybtex.style.formatting", "authoryear", AuthorYearStyle)


def setup(app):
    return {"parallel_read_safe": True, "parallel_write_safe": True}
