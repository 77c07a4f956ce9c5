"""
prisma/schema.prisma against the tables the migrations create.

The Next.js app reads and writes the server's tables through these models, and Prisma
never compares them with the database: a column a migration adds without a field, or a
field whose type, nullability or default differs from its column's, shows up only as a
failing query in the app. So this test migrates a fresh schema of the real PostgreSQL,
reads the tables back from the catalogs, and compares them with the models, read by a
parser of the subset of the Prisma schema language the file uses. It needs neither Node
nor the network; ``test_prisma_validates`` adds Prisma's own validation where a Prisma
CLI is at hand (``MARKETPLACE_WS_TEST_PRISMA``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TypeAlias

from attrs import field, frozen
from twisted.trial.unittest import SynchronousTestCase, TestCase

from marketplace_ws.db import Database, migrate

from . import pg

PRISMA_SCHEMA = Path(__file__).resolve().parent.parent / "prisma" / "schema.prisma"

#: The PostgreSQL schema the models name in ``@@schema``: the server's default.
SCHEMA = "marketplace_ws"

#: Tables of the server's own with no model: the app has no business with them.
NOT_MODELLED = frozenset({"schema_migrations"})


# -- The Prisma schema language, the part prisma/schema.prisma uses ---------------------


class PrismaSyntaxError(ValueError):
    pass


class Unsupported(Exception):
    """A column this check cannot compare yet: the message says what to teach it."""


@frozen
class Name:
    """A bare identifier used as a value: ``Cascade``, ``Desc``, ``true``, a field name."""

    name: str


@frozen
class Call:
    """A function call used as a value: ``now()``, ``id(sort: Desc)``."""

    name: str
    args: tuple[Value, ...] = ()
    kwargs: Mapping[str, Value] = field(factory=dict)


Value: TypeAlias = str | int | float | Name | Call | tuple["Value", ...]


@frozen
class Attribute:
    """``@id``, ``@db.Timestamptz(6)``, ``@@index([a, b], map: "x")`` (without the ``@``s)."""

    name: str
    args: tuple[Value, ...] = ()
    kwargs: Mapping[str, Value] = field(factory=dict)

    def arg(self, keyword: str) -> Value | None:
        """The first positional argument, or the argument named ``keyword``."""
        if self.args:
            return self.args[0]
        return self.kwargs.get(keyword)


@frozen
class Field:
    name: str
    type: str
    optional: bool = False
    is_list: bool = False
    attributes: tuple[Attribute, ...] = ()

    def attribute(self, name: str) -> Attribute | None:
        return next((a for a in self.attributes if a.name == name), None)

    @property
    def column(self) -> str:
        mapped = self.attribute("map")
        return self.name if mapped is None else _string(mapped.arg("name"))

    @property
    def native(self) -> str | None:
        """The native type attribute as written, without ``@db.``: ``Timestamptz(6)``."""
        for a in self.attributes:
            if a.name.startswith("db."):
                args = ", ".join(str(v) for v in a.args)
                return a.name[3:] + (f"({args})" if a.args else "")
        return None


@frozen
class Model:
    name: str
    fields: tuple[Field, ...]
    attributes: tuple[Attribute, ...] = ()
    #: The ``//`` comments directly above the model and inside it, without the slashes.
    comments: tuple[str, ...] = ()

    def attributes_named(self, name: str) -> list[Attribute]:
        return [a for a in self.attributes if a.name == name]

    def field_named(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)

    @property
    def table(self) -> str:
        mapped = self.attributes_named("map")
        return _string(mapped[0].arg("name")) if mapped else self.name

    @property
    def schema(self) -> str | None:
        schema = self.attributes_named("schema")
        return _string(schema[0].arg("name")) if schema else None


@frozen
class PrismaSchema:
    models: Mapping[str, Model]
    #: ``datasource`` and ``generator`` blocks: name to their assignments.
    datasources: Mapping[str, Mapping[str, Value]]
    generators: Mapping[str, Mapping[str, Value]]


def _string(value: Value | None) -> str:
    if not isinstance(value, str):
        raise PrismaSyntaxError(f"expected a string, not {value!r}")
    return value


_TOKEN = re.compile(
    r"""
    (?P<comment>//[^\n]*)
    | (?P<newline>\n)
    | (?P<space>[ \t\r]+)
    | (?P<string>"(?:[^"\\\n]|\\.)*")
    | (?P<number>-?\d+(?:\.\d+)?)
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<punct>@@|[@{}()\[\],:=?.])
    """,
    re.VERBOSE,
)


@frozen
class _Token:
    kind: str
    text: str
    line: int


def _tokens(text: str) -> Iterator[_Token]:
    line, pos = 1, 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise PrismaSyntaxError(f"line {line}: unexpected {text[pos]!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            yield _Token(kind, match.group(), line)
        line += kind == "newline"
        pos = match.end()
    yield _Token("end", "", line)


class _Parser:
    """
    Recursive descent over the tokens. Prisma's language is line-based: a field or a
    block attribute ends at a newline outside brackets, so newlines are tokens here and
    skipped only inside ``()`` and ``[]``.
    """

    def __init__(self, text: str) -> None:
        self._tokens = list(_tokens(text))
        self._pos = 0
        self._depth = 0

    def _peek(self) -> _Token:
        while True:
            token = self._tokens[self._pos]
            if token.kind == "comment" or (token.kind == "newline" and self._depth):
                self._pos += 1
                continue
            return token

    def _next(self) -> _Token:
        token = self._peek()
        self._pos += 1
        return token

    def _expect(self, text: str) -> _Token:
        token = self._next()
        if token.text != text:
            raise PrismaSyntaxError(f"line {token.line}: expected {text!r}, found {token.text!r}")
        return token

    def _name(self) -> str:
        token = self._next()
        if token.kind != "name":
            raise PrismaSyntaxError(f"line {token.line}: expected a name, found {token.text!r}")
        return token.text

    def _newlines(self) -> None:
        while self._peek().kind == "newline":
            self._next()

    def schema(self) -> PrismaSchema:
        models: dict[str, Model] = {}
        datasources: dict[str, Mapping[str, Value]] = {}
        generators: dict[str, Mapping[str, Value]] = {}
        while True:
            comments = self._leading_comments()
            self._newlines()
            token = self._next()
            if token.kind == "end":
                return PrismaSchema(models, datasources, generators)
            if token.text == "model":
                model = self._model(comments)
                if model.name in models:
                    raise PrismaSyntaxError(f"line {token.line}: model {model.name} twice")
                models[model.name] = model
            elif token.text in ("datasource", "generator"):
                name = self._name()
                into = datasources if token.text == "datasource" else generators
                into[name] = self._assignments()
            else:
                raise PrismaSyntaxError(
                    f"line {token.line}: {token.text!r} is not part of what this parser reads"
                    " (model, datasource, generator)"
                )

    def _leading_comments(self) -> tuple[str, ...]:
        """The run of comment lines just before the next block (a blank line ends a run)."""
        comments: list[str] = []
        blank = True
        while self._tokens[self._pos].kind in ("comment", "newline"):
            token = self._tokens[self._pos]
            if token.kind == "comment":
                comments.append(token.text[2:].strip())
                blank = False
            elif blank:
                comments = []
            else:
                blank = True
            self._pos += 1
        return tuple(comments)

    def _assignments(self) -> Mapping[str, Value]:
        self._expect("{")
        assignments: dict[str, Value] = {}
        while True:
            self._newlines()
            if self._peek().text == "}":
                self._next()
                return assignments
            key = self._name()
            self._expect("=")
            assignments[key] = self._value()

    def _model(self, comments: tuple[str, ...]) -> Model:
        name = self._name()
        start = self._expect("{").line
        fields: list[Field] = []
        attributes: list[Attribute] = []
        while True:
            self._newlines()
            token = self._peek()
            if token.text == "}":
                end = self._next().line
                break
            if token.text == "@@":
                self._next()
                attributes.append(self._attribute())
            else:
                fields.append(self._field())
            if self._peek().kind != "newline" and self._peek().text != "}":
                line = self._peek().line
                raise PrismaSyntaxError(f"line {line}: expected the end of the line")
        inside = tuple(
            t.text[2:].strip()
            for t in self._tokens
            if t.kind == "comment" and start <= t.line <= end
        )
        return Model(name, tuple(fields), tuple(attributes), comments + inside)

    def _field(self) -> Field:
        name = self._name()
        type_ = self._name()
        optional = is_list = False
        if self._peek().text == "?":
            self._next()
            optional = True
        elif self._peek().text == "[":
            self._next()
            self._expect("]")
            is_list = True
        attributes = []
        while self._peek().text == "@":
            self._next()
            attributes.append(self._attribute())
        return Field(name, type_, optional, is_list, tuple(attributes))

    def _attribute(self) -> Attribute:
        name = self._name()
        while self._peek().text == ".":
            self._next()
            name += "." + self._name()
        args: tuple[Value, ...] = ()
        kwargs: Mapping[str, Value] = {}
        if self._peek().text == "(":
            args, kwargs = self._arguments()
        return Attribute(name, args, kwargs)

    def _arguments(self) -> tuple[tuple[Value, ...], Mapping[str, Value]]:
        self._expect("(")
        self._depth += 1
        args: list[Value] = []
        kwargs: dict[str, Value] = {}
        while self._peek().text != ")":
            token = self._peek()
            following = self._tokens[self._pos + 1]
            if token.kind == "name" and following.text == ":":
                self._next()
                self._next()
                kwargs[token.text] = self._value()
            elif kwargs:
                raise PrismaSyntaxError(f"line {token.line}: positional argument after a named one")
            else:
                args.append(self._value())
            if self._peek().text != ")":
                self._expect(",")
        self._depth -= 1
        self._expect(")")
        return tuple(args), kwargs

    def _value(self) -> Value:
        token = self._next()
        if token.kind == "string":
            unquoted = json.loads(token.text)
            assert isinstance(unquoted, str)
            return unquoted
        if token.kind == "number":
            return float(token.text) if "." in token.text else int(token.text)
        if token.kind == "name":
            if self._peek().text == "(":
                args, kwargs = self._arguments()
                return Call(token.text, args, kwargs)
            return Name(token.text)
        if token.text == "[":
            self._depth += 1
            items: list[Value] = []
            while self._peek().text != "]":
                items.append(self._value())
                if self._peek().text != "]":
                    self._expect(",")
            self._depth -= 1
            self._expect("]")
            return tuple(items)
        raise PrismaSyntaxError(f"line {token.line}: expected a value, found {token.text!r}")


def parse(text: str) -> PrismaSchema:
    return _Parser(text).schema()


# -- The tables, from PostgreSQL's catalogs ------------------------------------------------


@frozen
class Column:
    name: str
    #: information_schema's data_type: "bigint", "timestamp with time zone", ...
    type: str
    nullable: bool
    default: str | None
    #: "ALWAYS" or "BY DEFAULT" for an identity column.
    identity: str | None = None
    precision: int | None = None
    length: int | None = None


@frozen
class Key:
    """A primary key, a unique constraint or a unique index."""

    name: str
    columns: tuple[str, ...]


@frozen
class ForeignKey:
    name: str
    columns: tuple[str, ...]
    table: str
    references: tuple[str, ...]
    #: Prisma's names of the referential actions.
    on_delete: str
    on_update: str


@frozen
class Index:
    name: str
    #: ``(column, descending)`` in order.
    columns: tuple[tuple[str, bool], ...]
    partial: bool = False
    unique: bool = False


@frozen
class Table:
    name: str
    columns: Mapping[str, Column]
    primary_key: Key | None
    uniques: tuple[Key, ...] = ()
    foreign_keys: tuple[ForeignKey, ...] = ()
    #: Indexes other than those of the primary key and unique constraints.
    indexes: tuple[Index, ...] = ()


_ACTIONS = {"a": "NoAction", "r": "Restrict", "c": "Cascade", "n": "SetNull", "d": "SetDefault"}

_INDEX_DEF = re.compile(
    r"CREATE (?P<unique>UNIQUE )?INDEX (?P<name>\S+) ON (?:ONLY )?\S+ USING btree"
    r" \((?P<columns>[^()]*)\)(?: WHERE (?P<where>.*))?"
)


def _index(definition: str) -> Index:
    match = _INDEX_DEF.fullmatch(definition)
    if match is None:
        raise AssertionError(f"an index this check cannot read: {definition}")
    columns = []
    for part in match["columns"].split(", "):
        words = part.split()
        columns.append((words[0].strip('"'), "DESC" in words[1:]))
    return Index(
        match["name"].strip('"'), tuple(columns), match["where"] is not None, bool(match["unique"])
    )


async def read_tables(db: Database, schema: str) -> dict[str, Table]:
    """The base tables of ``schema``, as PostgreSQL describes them."""
    names = [
        name
        for (name,) in await db.query(
            "prisma.tables",
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = %s AND table_type = 'BASE TABLE'",
            (schema,),
        )
    ]
    columns: dict[str, dict[str, Column]] = {name: {} for name in names}
    for (
        table,
        name,
        type_,
        nullable,
        default,
        identity,
        generation,
        precision,
        length,
    ) in await db.query(
        "prisma.columns",
        "SELECT table_name, column_name, data_type, is_nullable, column_default,"
        " is_identity, identity_generation, datetime_precision, character_maximum_length"
        " FROM information_schema.columns WHERE table_schema = %s",
        (schema,),
    ):
        if table in columns:
            columns[table][name] = Column(
                name,
                type_,
                nullable == "YES",
                default,
                generation if identity == "YES" else None,
                precision,
                length,
            )
    primary: dict[str, Key] = {}
    uniques: dict[str, list[Key]] = {name: [] for name in names}
    for table, name, kind, key_columns in await db.query(
        "prisma.keys",
        "SELECT tc.table_name, tc.constraint_name, tc.constraint_type,"
        "       array_agg(kcu.column_name::text ORDER BY kcu.ordinal_position)"
        " FROM information_schema.table_constraints tc"
        " JOIN information_schema.key_column_usage kcu"
        "   USING (constraint_schema, constraint_name, table_schema, table_name)"
        " WHERE tc.table_schema = %s AND tc.constraint_type IN ('PRIMARY KEY', 'UNIQUE')"
        " GROUP BY 1, 2, 3",
        (schema,),
    ):
        key = Key(name, tuple(key_columns))
        if kind == "PRIMARY KEY":
            primary[table] = key
        else:
            uniques[table].append(key)
    foreign: dict[str, list[ForeignKey]] = {name: [] for name in names}
    for name, table, target, key_columns, references, on_delete, on_update in await db.query(
        "prisma.foreign_keys",
        "SELECT c.conname::text, t.relname::text, r.relname::text,"
        "       ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k (n, i)"
        "             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n"
        "             ORDER BY k.i),"
        "       ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k (n, i)"
        "             JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n"
        "             ORDER BY k.i),"
        "       c.confdeltype::text, c.confupdtype::text"
        " FROM pg_constraint c"
        " JOIN pg_class t ON t.oid = c.conrelid"
        " JOIN pg_class r ON r.oid = c.confrelid"
        " JOIN pg_namespace n ON n.oid = t.relnamespace"
        " WHERE c.contype = 'f' AND n.nspname = %s",
        (schema,),
    ):
        foreign[table].append(
            ForeignKey(
                name,
                tuple(key_columns),
                target,
                tuple(references),
                _ACTIONS[on_delete],
                _ACTIONS[on_update],
            )
        )
    indexes: dict[str, list[Index]] = {name: [] for name in names}
    for table, definition in await db.query(
        "prisma.indexes",
        "SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = %s",
        (schema,),
    ):
        index = _index(definition)
        constraints = {k.name for k in uniques[table]}
        if table in primary:
            constraints.add(primary[table].name)
        if index.name not in constraints:
            indexes[table].append(index)
    return {
        name: Table(
            name,
            columns[name],
            primary.get(name),
            tuple(uniques[name]),
            tuple(foreign[name]),
            tuple(indexes[name]),
        )
        for name in names
    }


# -- The comparison ------------------------------------------------------------------------


def _native_types(column: Column) -> tuple[str, set[str | None]]:
    """
    The Prisma type of a column and the native type attributes (without ``@db.``) that
    state it; None where the Prisma type alone does (PostgreSQL's default for the type).
    """
    p, n = column.precision, column.length
    types: dict[str, tuple[str, set[str | None]]] = {
        "bigint": ("BigInt", {None, "BigInt"}),
        "integer": ("Int", {None, "Integer"}),
        "smallint": ("Int", {"SmallInt"}),
        "boolean": ("Boolean", {None, "Boolean"}),
        "text": ("String", {None, "Text"}),
        "character varying": ("String", {"VarChar" if n is None else f"VarChar({n})"}),
        "uuid": ("String", {"Uuid"}),
        "double precision": ("Float", {None, "DoublePrecision"}),
        "jsonb": ("Json", {None, "JsonB"}),
        "json": ("Json", {"Json"}),
        "date": ("DateTime", {"Date"}),
        "timestamp with time zone": ("DateTime", {f"Timestamptz({p})"}),
        # Prisma's DateTime is timestamp(3) on PostgreSQL.
        "timestamp without time zone": (
            "DateTime",
            {f"Timestamp({p})"} | ({None} if p == 3 else set()),
        ),
    }
    if column.type not in types:
        raise Unsupported(
            f"column {column.name} is of type {column.type}, which this check does not map to"
            " a Prisma type yet: add it to _native_types"
        )
    return types[column.type]


_LITERAL = re.compile(r"'((?:[^']|'')*)'::[a-z ]+")


def _sql_default(column: Column) -> Value | None:
    """A column's default as the Prisma ``@default`` argument that states it."""
    default = column.default
    if column.identity is not None or (default or "").startswith("nextval("):
        return Call("autoincrement")
    if default is None:
        return None
    if default in ("now()", "CURRENT_TIMESTAMP"):
        return Call("now")
    if default in ("true", "false"):
        return Name(default)
    if re.fullmatch(r"-?\d+", default):
        return int(default)
    match = _LITERAL.fullmatch(default)
    if match is None:
        raise Unsupported(
            f"column {column.name} defaults to {default}, which this check cannot compare"
            " with a Prisma @default yet: teach _sql_default"
        )
    return match[1].replace("''", "'")


def _show(value: Value | None) -> str:
    if value is None:
        return "no @default"
    if isinstance(value, Call):
        return f"@default({value.name}())"
    if isinstance(value, Name):
        return f"@default({value.name})"
    return f"@default({json.dumps(value)})"


def _same_default(sql: Value | None, prisma: Value | None, column: Column) -> bool:
    if column.type in ("json", "jsonb") and isinstance(sql, str) and isinstance(prisma, str):
        try:
            return bool(json.loads(sql) == json.loads(prisma))
        except ValueError:
            return False
    return sql == prisma


def _field_names(value: Value | None) -> tuple[tuple[str, bool], ...]:
    """``[a, b(sort: Desc)]`` as ``(("a", False), ("b", True))``."""
    if not isinstance(value, tuple):
        raise PrismaSyntaxError(f"expected a list of fields, not {value!r}")
    names = []
    for item in value:
        if isinstance(item, Name):
            names.append((item.name, False))
        elif isinstance(item, Call) and set(item.kwargs) <= {"sort"}:
            names.append((item.name, item.kwargs.get("sort") == Name("Desc")))
        else:
            raise PrismaSyntaxError(f"expected a field, not {item!r}")
    return tuple(names)


def _map(attribute: Attribute, default: str) -> str:
    name = attribute.kwargs.get("map")
    return default if name is None else _string(name)


class _ModelCheck:
    """One model against its table; ``problems`` says where they differ."""

    def __init__(self, model: Model, table: Table, schema: PrismaSchema) -> None:
        self.model = model
        self.table = table
        self.schema = schema
        self.problems: list[str] = []
        self.scalars = {f.name: f for f in model.fields if f.type not in schema.models}

    def columns(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Field names to column names; a name that is no scalar field is a problem."""
        columns = []
        for name in names:
            if name in self.scalars:
                columns.append(self.scalars[name].column)
            else:
                self.problems.append(f"{self.model.name} has no scalar field {name}")
                columns.append(name)
        return tuple(columns)

    def key_name(self, columns: tuple[str, ...], suffix: str) -> str:
        """Prisma's name for a key or index that has no ``map:``."""
        return f"{self.table.name}_{'_'.join(columns)}_{suffix}"

    def run(self) -> list[str]:
        self.check_columns()
        self.check_primary_key()
        self.check_uniques()
        self.check_indexes()
        self.check_relations()
        return self.problems

    def check_columns(self) -> None:
        model, table = self.model, self.table
        by_column: dict[str, Field] = {}
        for f in self.scalars.values():
            if f.column in by_column:
                self.problems.append(
                    f"{model.name}.{by_column[f.column].name} and {model.name}.{f.name}"
                    f" both map to {table.name}.{f.column}"
                )
            by_column[f.column] = f
        for name, column in table.columns.items():
            if name not in by_column:
                self.problems.append(
                    f"{table.name}.{name} ({column.type}) has no field in model {model.name}"
                )
        for name, f in by_column.items():
            found = table.columns.get(name)
            if found is None:
                self.problems.append(
                    f"{model.name}.{f.name} maps to column {table.name}.{name},"
                    " which the migrations do not create"
                )
            else:
                self.check_column(f, found)

    def check_column(self, f: Field, column: Column) -> None:
        try:
            self.compare_column(f, column)
        except Unsupported as e:
            self.problems.append(f"{self.table.name}: {e}")

    def compare_column(self, f: Field, column: Column) -> None:
        where = f"{self.table.name}.{column.name} ({column.type})"
        prisma_type, natives = _native_types(column)
        written = f.type + ("[]" if f.is_list else "") + (f" @db.{f.native}" if f.native else "")
        if f.type != prisma_type or f.is_list or f.native not in natives:
            wanted = " or ".join(
                sorted(prisma_type + ("" if n is None else f" @db.{n}") for n in natives)
            )
            self.problems.append(
                f"{where} is {wanted} in Prisma, but {self.model.name}.{f.name} is {written}"
            )
        if column.nullable != f.optional:
            self.problems.append(
                f"{where} is {'NULL' if column.nullable else 'NOT NULL'}, but"
                f" {self.model.name}.{f.name} is {'optional' if f.optional else 'required'}"
            )
        attribute = f.attribute("default")
        prisma = None if attribute is None else attribute.arg("value")
        sql = _sql_default(column)
        if not _same_default(sql, prisma, column):
            said = column.default or (f"GENERATED {column.identity} AS IDENTITY")
            self.problems.append(
                f"{where} {'has no default' if sql is None else 'defaults to ' + said}, but"
                f" {self.model.name}.{f.name} has {_show(prisma)}"
            )

    def check_primary_key(self) -> None:
        model, table = self.model, self.table
        ids: list[tuple[tuple[str, ...], Attribute]] = []
        for f in self.scalars.values():
            a = f.attribute("id")
            if a is not None:
                ids.append(((f.name,), a))
        for a in model.attributes_named("id"):
            ids.append((tuple(name for name, _ in _field_names(a.arg("fields"))), a))
        if table.primary_key is None:
            if ids:
                self.problems.append(f"{model.name} has an id, but {table.name} no primary key")
            return
        if len(ids) != 1:
            self.problems.append(
                f"{table.name} has primary key {table.primary_key.columns}, but {model.name}"
                f" has {len(ids)} @id/@@id"
            )
            return
        [(fields, attribute)] = ids
        columns = self.columns(fields)
        name = _map(attribute, f"{table.name}_pkey")
        if Key(name, columns) != table.primary_key:
            self.problems.append(
                f"{table.name} has primary key {table.primary_key.name} on"
                f" {', '.join(table.primary_key.columns)}, but {model.name}'s id is {name} on"
                f" {', '.join(columns)}"
            )

    def check_uniques(self) -> None:
        model, table = self.model, self.table
        declared: set[Key] = set()
        for f in self.scalars.values():
            a = f.attribute("unique")
            if a is not None:
                declared.add(Key(_map(a, self.key_name((f.column,), "key")), (f.column,)))
        for a in model.attributes_named("unique"):
            columns = self.columns(tuple(n for n, _ in _field_names(a.arg("fields"))))
            declared.add(Key(_map(a, self.key_name(columns, "key")), columns))
        # A unique index that is not partial is a unique constraint to Prisma.
        actual = set(table.uniques) | {
            Key(i.name, tuple(c for c, _ in i.columns))
            for i in table.indexes
            if i.unique and not i.partial
        }
        for key in sorted(actual - declared, key=str):
            self.problems.append(
                f"{table.name} has unique {key.name} on {', '.join(key.columns)}, which"
                f" {model.name} does not declare (@unique or @@unique)"
            )
        for key in sorted(declared - actual, key=str):
            self.problems.append(
                f"{model.name} declares unique {key.name} on {', '.join(key.columns)}, which"
                f" {table.name} does not have"
            )

    def check_indexes(self) -> None:
        model, table = self.model, self.table
        declared: dict[str, tuple[tuple[str, bool], ...]] = {}
        for a in model.attributes_named("index"):
            fields = _field_names(a.arg("fields"))
            columns = tuple(
                zip(self.columns(tuple(n for n, _ in fields)), (d for _, d in fields), strict=True)
            )
            declared[_map(a, self.key_name(tuple(c for c, _ in columns), "idx"))] = columns
        comments = "\n".join(model.comments)
        for index in table.indexes:
            if index.partial:
                if not re.search(rf"\b{re.escape(index.name)}\b", comments):
                    self.problems.append(
                        f"partial index {index.name} on {table.name} is not named in a comment"
                        f" of model {model.name}: Prisma cannot state it, so say so there"
                    )
                continue
            if index.unique:
                continue
            shown = ", ".join(c + (" DESC" if d else "") for c, d in index.columns)
            if index.name not in declared:
                self.problems.append(
                    f"{table.name} has index {index.name} on ({shown}), which {model.name}"
                    " does not declare (@@index)"
                )
            elif declared.pop(index.name) != index.columns:
                self.problems.append(
                    f"{table.name} has index {index.name} on ({shown}), but {model.name}'s"
                    " @@index of that name differs"
                )
        partial = {i.name for i in table.indexes if i.partial}
        for name in sorted(declared):
            self.problems.append(
                f"{model.name} declares index {name}, which on {table.name} is partial: name it"
                " in a comment instead"
                if name in partial
                else f"{model.name} declares index {name}, which {table.name} does not have"
            )

    def check_relations(self) -> None:
        model, table = self.model, self.table
        declared: dict[tuple[str, ...], tuple[Field, Attribute]] = {}
        for f in model.fields:
            a = f.attribute("relation")
            if f.type in self.schema.models and a is not None and "fields" in a.kwargs:
                columns = self.columns(tuple(n for n, _ in _field_names(a.kwargs["fields"])))
                declared[columns] = (f, a)
        for key in table.foreign_keys:
            shown = f"foreign key {key.name} of {table.name} ({', '.join(key.columns)})"
            if key.columns not in declared:
                self.problems.append(f"{shown} has no relation field in {model.name}")
                continue
            f, a = declared.pop(key.columns)
            target = self.schema.models[f.type]
            references = tuple(
                getattr(target.field_named(n), "column", n)
                for n, _ in _field_names(a.kwargs.get("references"))
            )
            if target.table != key.table or references != key.references:
                self.problems.append(
                    f"{shown} references {key.table} ({', '.join(key.references)}), but"
                    f" {model.name}.{f.name} references {target.table}"
                    f" ({', '.join(references)})"
                )
            # Prisma's defaults: onDelete Restrict, or SetNull where the relation is
            # optional; onUpdate Cascade.
            optional = any(
                getattr(self.scalars.get(n), "optional", False)
                for n, _ in _field_names(a.kwargs["fields"])
            )
            actions = {
                "onDelete": a.kwargs.get("onDelete", Name("SetNull" if optional else "Restrict")),
                "onUpdate": a.kwargs.get("onUpdate", Name("Cascade")),
            }
            for action, actual in (("onDelete", key.on_delete), ("onUpdate", key.on_update)):
                if actions[action] != Name(actual):
                    self.problems.append(
                        f"{shown} has {action} {actual}, but {model.name}.{f.name} has"
                        f" {action} {getattr(actions[action], 'name', actions[action])}"
                    )
        for columns, (f, _) in declared.items():
            self.problems.append(
                f"{model.name}.{f.name} is a relation on {table.name} ({', '.join(columns)}),"
                " which has no foreign key there"
            )


def compare(schema: PrismaSchema, tables: Mapping[str, Table]) -> list[str]:
    """Where the models and the tables differ: nothing when they match."""
    problems = []
    [datasource] = schema.datasources.values()
    listed = datasource.get("schemas", ())
    for wanted in ("public", SCHEMA):
        if not isinstance(listed, tuple) or wanted not in listed:
            problems.append(f"the datasource's schemas do not list {wanted!r}")
    models: dict[str, Model] = {}
    for model in schema.models.values():
        if model.schema != SCHEMA:
            problems.append(f"model {model.name} is not @@schema({json.dumps(SCHEMA)})")
        if model.table in models:
            problems.append(
                f"models {models[model.table].name} and {model.name} both map to {model.table}"
            )
        models[model.table] = model
    for name in sorted(set(tables) - set(models) - NOT_MODELLED):
        problems.append(f"table {name} has no model")
    for name in sorted(set(models) - set(tables)):
        problems.append(
            f"model {models[name].name} maps to table {name}, which the migrations do not create"
        )
    for name in sorted(set(models) & set(tables)):
        problems.extend(_ModelCheck(models[name], tables[name], schema).run())
    return problems


# -- The tests -------------------------------------------------------------------------------


class ParserTests(SynchronousTestCase):
    def test_model(self) -> None:
        schema = parse(
            "// about the model\n"
            "//\n"
            "// more\n"
            "model A {\n"
            "  id   BigInt    @id @default(autoincrement()) // the id\n"
            '  at   DateTime? @map("at_") @db.Timestamptz(6)\n'
            "  bs   B[]\n"
            '  @@index([at, id(sort: Desc)], map: "a_idx")\n'
            '  @@map("a")\n'
            "}\n"
        )
        a = schema.models["A"]
        self.assertEqual(a.comments, ("about the model", "", "more", "the id"))
        self.assertEqual(a.table, "a")
        self.assertEqual(
            a.fields[0],
            Field(
                "id",
                "BigInt",
                attributes=(Attribute("id"), Attribute("default", (Call("autoincrement"),))),
            ),
        )
        self.assertEqual(
            (a.fields[1].optional, a.fields[1].column, a.fields[1].native),
            (True, "at_", "Timestamptz(6)"),
        )
        self.assertEqual((a.fields[2].type, a.fields[2].is_list), ("B", True))
        [index] = a.attributes_named("index")
        self.assertEqual(_field_names(index.arg("fields")), (("at", False), ("id", True)))
        self.assertEqual(index.kwargs, {"map": "a_idx"})

    def test_comments_before_a_blank_line_belong_to_no_model(self) -> None:
        schema = parse("// the file\n\n// the model\nmodel A {\n  id Int @id\n}\n")
        self.assertEqual(schema.models["A"].comments, ("the model",))

    def test_blocks(self) -> None:
        schema = parse(
            'generator client {\n  provider = "prisma-client"\n  previewFeatures = ["x"]\n}\n'
            'datasource db {\n  provider = "postgresql"\n  schemas = ["public", "s"]\n}\n'
        )
        self.assertEqual(schema.generators["client"]["previewFeatures"], ("x",))
        self.assertEqual(schema.datasources["db"]["schemas"], ("public", "s"))

    def test_arguments_across_lines(self) -> None:
        schema = parse('model A {\n  id Int @id\n  @@index([\n    id,\n  ], map: "x")\n}\n')
        [index] = schema.models["A"].attributes_named("index")
        self.assertEqual(index.args, ((Name("id"),),))

    def test_errors_name_the_line(self) -> None:
        for text, message in [
            ("enum Kind {\n  a\n}\n", "line 1: 'enum' is not part of what this parser reads"),
            ("model A {\n  id Int @id $\n}\n", "line 2: unexpected '$'"),
            ("model A {\n  id Int @id id2 Int\n}\n", "line 2: expected the end of the line"),
            ('model A {\n  id Int @default(map: "x", 1)\n}\n', "line 2: positional argument"),
        ]:
            error = self.assertRaises(PrismaSyntaxError, parse, text)
            self.assertTrue(str(error).startswith(message), str(error))


class SchemaFileTests(TestCase):
    """prisma/schema.prisma against a freshly migrated schema."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.schema = pg.fresh_schema(self)
        self.db = await pg.open_database(self, schema=self.schema)
        await migrate(self.db, self.schema)
        self.prisma = PRISMA_SCHEMA.read_text("utf-8")

    async def problems(self, sql: str | None = None, prisma: str | None = None) -> list[str]:
        """
        The checker's findings after running ``sql`` on the migrated schema, against
        ``prisma`` (the schema file by default).
        """
        if sql is not None:
            await self.db.query("t", sql)
        return compare(
            parse(self.prisma if prisma is None else prisma),
            await read_tables(self.db, self.schema),
        )

    def edit(self, old: str, new: str) -> str:
        """The schema file with ``old`` (which must occur exactly once) replaced."""
        self.assertEqual(self.prisma.count(old), 1, old)
        return self.prisma.replace(old, new)

    async def test_matches_migrations(self) -> None:
        """Every table, column, key, index and foreign key the migrations make is modelled."""
        self.assertEqual(await self.problems(), [])

    async def test_models(self) -> None:
        tables = await read_tables(self.db, self.schema)
        self.assertEqual(
            {m.table for m in parse(self.prisma).models.values()}, set(tables) - NOT_MODELLED
        )

    async def test_added_column(self) -> None:
        """A migration that adds a column fails the test until the model has the field."""
        self.assertEqual(
            await self.problems(
                "ALTER TABLE outbox ADD COLUMN attempts integer NOT NULL DEFAULT 0"
            ),
            ["outbox.attempts (integer) has no field in model Outbox"],
        )
        self.assertEqual(
            await self.problems(
                prisma=self.edit(
                    "  error       String?\n",
                    "  error       String?\n  attempts    Int       @default(0)\n",
                )
            ),
            [],
        )

    async def test_added_table(self) -> None:
        self.assertEqual(
            await self.problems("CREATE TABLE receipts (id bigint PRIMARY KEY)"),
            ["table receipts has no model"],
        )

    async def test_dropped_column(self) -> None:
        self.assertEqual(
            await self.problems("ALTER TABLE notifications DROP COLUMN read_at"),
            [
                "Notification.readAt maps to column notifications.read_at,"
                " which the migrations do not create"
            ],
        )

    async def test_model_without_table(self) -> None:
        self.assertEqual(
            await self.problems("DROP TABLE outbox"),
            ["model Outbox maps to table outbox, which the migrations do not create"],
        )

    async def test_nullability(self) -> None:
        self.assertEqual(
            await self.problems(
                prisma=self.edit(
                    '  readAt         DateTime? @map("read_at")',
                    '  readAt         DateTime  @map("read_at")',
                )
            ),
            [
                "notifications.read_at (timestamp with time zone) is NULL, but"
                " Notification.readAt is required"
            ],
        )
        self.assertEqual(
            await self.problems("ALTER TABLE messages ALTER COLUMN body DROP NOT NULL"),
            ["messages.body (text) is NULL, but Message.body is required"],
        )

    async def test_types(self) -> None:
        edited = self.edit(
            '@map("published_at") @db.Timestamptz(6)', '@map("published_at")'
        ).replace("lastMessageId BigInt?", "lastMessageId Int?   ")
        self.assertEqual(
            await self.problems(prisma=edited),
            [
                "conversations.last_message_id (bigint) is BigInt or BigInt @db.BigInt in Prisma,"
                " but Conversation.lastMessageId is Int",
                "outbox.published_at (timestamp with time zone) is DateTime @db.Timestamptz(6)"
                " in Prisma, but Outbox.publishedAt is DateTime",
            ],
        )
        self.assertEqual(
            await self.problems("ALTER TABLE participants ALTER COLUMN role TYPE varchar(32)"),
            [
                "participants.role (character varying) is String @db.VarChar(32) in Prisma,"
                " but Participant.role is String"
            ],
        )

    async def test_defaults(self) -> None:
        # "{ }" is the same JSON as the column's '{}'.
        edited = self.edit(
            '  data        Json      @default("{}") @db.JsonB\n'
            '  createdAt   DateTime  @default(now()) @map("created_at")',
            '  data        Json      @default("{ }") @db.JsonB\n'
            '  createdAt   DateTime  @map("created_at")',
        ).replace(
            "model Outbox {\n  id          BigInt    @id @default(autoincrement())",
            "model Outbox {\n  id          BigInt    @id",
        )
        self.assertEqual(
            await self.problems(prisma=edited),
            [
                "outbox.id (bigint) defaults to GENERATED ALWAYS AS IDENTITY, but Outbox.id has"
                " no @default",
                "outbox.created_at (timestamp with time zone) defaults to now(), but"
                " Outbox.createdAt has no @default",
            ],
        )
        self.assertEqual(
            await self.problems("ALTER TABLE messages ALTER COLUMN kind SET DEFAULT 'system'"),
            [
                "messages.kind (text) defaults to 'system'::text, but Message.kind has"
                ' @default("user")'
            ],
        )
        self.assertEqual(
            await self.problems("ALTER TABLE messages ALTER COLUMN kind DROP DEFAULT"),
            ['messages.kind (text) has no default, but Message.kind has @default("user")'],
        )

    async def test_unique(self) -> None:
        self.assertEqual(
            await self.problems(
                "ALTER TABLE notifications"
                " DROP CONSTRAINT notifications_user_id_idempotency_key_key;"
                "ALTER TABLE outbox ADD UNIQUE (channel, event)"
            ),
            [
                "Notification declares unique notifications_user_id_idempotency_key_key on"
                " user_id, idempotency_key, which notifications does not have",
                "outbox has unique outbox_channel_event_key on channel, event, which Outbox"
                " does not declare (@unique or @@unique)",
            ],
        )

    async def test_primary_key(self) -> None:
        self.assertEqual(
            await self.problems(
                "ALTER TABLE participants DROP CONSTRAINT participants_pkey;"
                "ALTER TABLE participants ADD PRIMARY KEY (user_id, conversation_id)"
            ),
            [
                "participants has primary key participants_pkey on user_id, conversation_id,"
                " but Participant's id is participants_pkey on conversation_id, user_id"
            ],
        )

    async def test_indexes(self) -> None:
        self.assertEqual(
            await self.problems(
                "CREATE INDEX outbox_channel_idx ON outbox (channel);"
                "DROP INDEX messages_conversation_idx;"
                "CREATE INDEX messages_conversation_idx ON messages (conversation_id, id)"
            ),
            [
                "messages has index messages_conversation_idx on (conversation_id, id), but"
                " Message's @@index of that name differs",
                "outbox has index outbox_channel_idx on (channel), which Outbox does not declare"
                " (@@index)",
            ],
        )

    async def test_declared_index_missing(self) -> None:
        edited = self.edit(
            '  @@map("outbox")\n',
            '  @@index([channel], map: "outbox_channel_idx")\n'
            '  @@index([id], map: "outbox_pending_idx")\n'
            '  @@map("outbox")\n',
        )
        self.assertEqual(
            await self.problems(prisma=edited),
            [
                "Outbox declares index outbox_channel_idx, which outbox does not have",
                "Outbox declares index outbox_pending_idx, which on outbox is partial: name it"
                " in a comment instead",
            ],
        )

    async def test_partial_index(self) -> None:
        """Prisma cannot state a partial index: the model's comments must name it."""
        self.assertEqual(
            await self.problems(
                "CREATE INDEX outbox_failed_idx ON outbox (id) WHERE failed_at IS NOT NULL"
            ),
            [
                "partial index outbox_failed_idx on outbox is not named in a comment of model"
                " Outbox: Prisma cannot state it, so say so there"
            ],
        )

    async def test_foreign_keys(self) -> None:
        self.assertEqual(
            await self.problems(
                "ALTER TABLE messages DROP CONSTRAINT messages_conversation_id_fkey;"
                "ALTER TABLE participants DROP CONSTRAINT participants_conversation_id_fkey;"
                "ALTER TABLE participants ADD FOREIGN KEY (conversation_id)"
                "  REFERENCES conversations (id) ON DELETE RESTRICT"
            ),
            [
                "Message.conversation is a relation on messages (conversation_id), which has no"
                " foreign key there",
                "foreign key participants_conversation_id_fkey of participants (conversation_id)"
                " has onDelete Restrict, but Participant.conversation has onDelete Cascade",
            ],
        )

    async def test_unknown_type(self) -> None:
        """A column type the check does not know is reported, not passed over."""
        edited = self.edit(
            "  error       String?\n", "  error       String?\n  amount      Decimal\n"
        )
        self.assertEqual(
            await self.problems(
                "ALTER TABLE outbox ADD COLUMN amount numeric(10, 2) NOT NULL", edited
            ),
            [
                "outbox: column amount is of type numeric, which this check does not map to a"
                " Prisma type yet: add it to _native_types"
            ],
        )

    async def test_schema_names(self) -> None:
        edited = self.edit('  @@map("outbox")\n  @@schema("marketplace_ws")', '  @@map("outbox")')
        edited = edited.replace('schemas  = ["public", "marketplace_ws"]', 'schemas  = ["public"]')
        self.assertEqual(
            await self.problems(prisma=edited),
            [
                "the datasource's schemas do not list 'marketplace_ws'",
                'model Outbox is not @@schema("marketplace_ws")',
            ],
        )
