"""Writes the shell completions and the man page from the ``pytunnel`` click command.

Every option, metavar, help text and ``-o`` key comes from ``tunnel.cli.command`` and
``tunnel.cli.OPTION_KEYS`` as they are when this runs, so the files cannot drift from the
CLI: ``tests/cli`` regenerates them and fails on any difference. Only the prose of the
man page lives here, as templates.

    python completions/generate.py            rewrite completions/* and man/pytunnel.1
    python completions/generate.py --check    exit 1 and print a diff if any file differs
    python completions/generate.py --output DIR   write the files under DIR instead
"""

from __future__ import annotations

import argparse
import difflib
import enum
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
# Document the checkout this script lives in, not some other installed pytunnel.
sys.path.insert(0, str(ROOT))

import click  # noqa: E402

from tunnel import __version__, app, cli, events  # noqa: E402
from tunnel import config as tunnel_config  # noqa: E402
from tunnel.errors import ConfigError, ExitStatus  # noqa: E402

PROG = cli.PROG
BASH = Path("completions/pytunnel.bash")
ZSH = Path("completions/_pytunnel")
FISH = Path("completions/pytunnel.fish")
MAN = Path("man/pytunnel.1")
# The man page's date (mandoc wants one). Fixed, so regenerating is reproducible: bump it
# when a release changes the page.
MAN_DATE = "2026-11-28"


# -- the model: what the CLI offers --------------------------------------------------


class Kind(enum.Enum):
    """What an option's value is, for completion."""

    NONE = "none"  # free text: nothing to offer
    FILE = "file"
    HOST = "host"  # [user@]host
    HOSTS = "hosts"  # [user@]host[,...]
    USER = "user"  # a local user name
    KEY = "key"  # an ssh_config Key=Value (-o)
    CHOICE = "choice"


# Kinds the heuristics in _option_kind cannot see. Keyed by option name; an entry for an
# option the CLI no longer has is simply unused.
KIND_BY_NAME: dict[str, Kind] = {"-o": Kind.KEY}

# -o keys whose values are host names; keys named *File take files.
KEY_KINDS: dict[str, Kind] = {"hostname": Kind.HOST, "proxyjump": Kind.HOSTS}

# A value no key's parser should take unless the key takes free text.
_NOT_A_VALUE = "zzqx-not-a-value"


@dataclass(frozen=True, slots=True)
class Option:
    names: tuple[str, ...]
    metavar: str | None  # None: a flag
    help: str
    repeatable: bool
    kind: Kind
    choices: tuple[str, ...] = ()
    default: str | None = None
    exits: bool = False  # -h, -V: print something and exit

    @property
    def summary(self) -> str:
        return _summary(self.help)


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    default: str
    help: str
    repeatable: bool
    values: tuple[str, ...]
    kind: Kind


@dataclass(frozen=True, slots=True)
class Model:
    options: tuple[Option, ...]
    destination: str  # the positional argument's metavar
    keys: tuple[Key, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for option in self.options for name in option.names)

    def valued(self) -> tuple[str, ...]:
        return tuple(n for o in self.options if o.metavar is not None for n in o.names)

    def flags(self) -> tuple[str, ...]:
        return tuple(n for o in self.options if o.metavar is None for n in o.names)

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if name in o.names), None)

    def names_of(self, kind: Kind) -> tuple[str, ...]:
        return tuple(n for o in self.options if o.kind is kind for n in o.names)


def _summary(text: str) -> str:
    """The first sentence of a help text, for one-line descriptions."""
    first = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return first.rstrip(".")


def _clean(text: str | None) -> str:
    return " ".join((text or "").replace("\b", " ").split())


def _shown_default(param: click.Option) -> str | None:
    if not param.show_default or isinstance(param.default, bool):
        return None
    value = param.default
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (int, str)) and value != "":
        return str(value)
    return None


def _option_kind(param: click.Option, metavar: str) -> tuple[Kind, tuple[str, ...]]:
    for name in (*param.opts, *param.secondary_opts):
        if name in KIND_BY_NAME:
            return KIND_BY_NAME[name], ()
    if isinstance(param.type, click.Choice):
        return Kind.CHOICE, tuple(str(c) for c in param.type.choices)
    if isinstance(param.type, (click.Path, click.File)):
        return Kind.FILE, ()
    lowered = metavar.lower()
    if "file" in lowered or "path" in lowered:
        return Kind.FILE, ()
    if "host" in lowered:
        return (Kind.HOSTS if "," in lowered else Kind.HOST), ()
    if "login" in lowered:
        return Kind.USER, ()
    return Kind.NONE, ()


def _options(command: click.Command) -> tuple[tuple[Option, ...], str]:
    ctx = click.Context(command, info_name=PROG, **command.context_settings)
    options: list[Option] = []
    destination = ""
    for param in command.get_params(ctx):
        if isinstance(param, click.Argument):
            destination = param.metavar or (param.name or "ARG").upper()
            continue
        if not isinstance(param, click.Option) or param.hidden:
            continue
        takes_value = not param.is_flag and not param.count
        metavar = (param.metavar or param.type.name.upper()) if takes_value else None
        kind, choices = _option_kind(param, metavar) if metavar else (Kind.NONE, ())
        options.append(
            Option(
                names=(*param.opts, *param.secondary_opts),
                metavar=metavar,
                help=_clean(param.help),
                repeatable=param.multiple or param.count,
                kind=kind,
                choices=choices,
                default=_shown_default(param),
                exits=param.is_eager and not param.expose_value,
            )
        )
    return tuple(options), destination


def _vocabulary() -> tuple[str, ...]:
    """Words a key with enumerated values may take: yes/no, every value of the config
    enums, the LogLevel names. Each key's own parser decides which ones it takes."""
    words = ["yes", "no"]
    for item in vars(tunnel_config).values():
        if isinstance(item, type) and issubclass(item, enum.Enum):
            words += [m.value for m in item if isinstance(m.value, str)]
    levels = getattr(cli, "LOG_LEVELS", {})
    if isinstance(levels, dict):
        words += [str(name) for name in levels]
    return tuple(dict.fromkeys(words))


def _accepts(setter: Callable[[dict[str, object], str], None], value: str) -> bool:
    try:
        setter({}, value)
    except (ConfigError, ValueError):
        return False
    return True


def _key_values(key: cli.OptionKey) -> tuple[str, ...]:
    if _accepts(key.setter, _NOT_A_VALUE):
        return ()
    values = tuple(word for word in _vocabulary() if _accepts(key.setter, word))
    return values if len(values) >= 2 else ()


def _keys() -> tuple[Key, ...]:
    keys = []
    for entry in cli.OPTION_KEYS.values():
        values = _key_values(entry)
        if values:
            kind = Kind.CHOICE
        elif entry.name.endswith("File"):
            kind = Kind.FILE
        else:
            kind = KEY_KINDS.get(entry.name.lower(), Kind.NONE)
        keys.append(
            Key(entry.name, entry.default, _clean(entry.help), entry.repeatable, values, kind)
        )
    return tuple(keys)


def build_model() -> Model:
    options, destination = _options(cli.command)
    return Model(options, destination, _keys())


# -- shared by the shells: host names --------------------------------------------------

# ssh_config Host lines (not patterns or negations) and known_hosts names (not hashed
# |1| entries; after an @cert-authority/@revoked marker; [host]:port as host). Run as
#   awk PROGRAM kind=config FILE kind=known FILE
HOSTS_AWK = """\
function emit(name) {
    if (name != "" && name !~ /[*?!]/ && !seen[name]++) print name
}
kind == "config" {
    line = $0
    sub(/^[ \\t]+/, "", line)
    if (tolower(substr(line, 1, 4)) != "host" || substr(line, 5, 1) !~ /[ \\t=]/) next
    line = substr(line, 5)
    sub(/^[ \\t]*=?[ \\t]*/, "", line)
    sub(/[ \\t]*#.*$/, "", line)
    gsub(/"/, "", line)
    n = split(line, names, /[ \\t]+/)
    for (i = 1; i <= n; i++) emit(names[i])
    next
}
kind == "known" {
    field = $1
    if (field ~ /^@/) field = $2
    if (field == "" || field ~ /^[#|]/) next
    n = split(field, names, ",")
    for (i = 1; i <= n; i++) {
        name = names[i]
        if (name ~ /^\\[/) {
            sub(/^\\[/, "", name)
            sub(/\\]:[0-9]+$/, "", name)
        }
        emit(name)
    }
}
"""


def _sh_quote(text: str) -> str:
    """Single quotes for bash and zsh."""
    return "'" + text.replace("'", "'\\''") + "'"


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _indent(text: str, prefix: str) -> str:
    return "".join(prefix + line if line.strip() else line for line in text.splitlines(True))


def _fill(template: str, **values: str) -> str:
    for name, value in values.items():
        template = template.replace(f"@{name}@", value)
    leftover = re.search(r"@[A-Z_]+@", template)
    if leftover:
        raise ValueError(f"template placeholder {leftover.group()} not filled")
    return template


def _pattern(names: Iterable[str]) -> str:
    """A case pattern matching any of ``names``, or one that matches nothing."""
    return "|".join(names) or "@@never@@"


HEADER = "Generated by completions/generate.py from the pytunnel command: do not edit."


# -- bash ---------------------------------------------------------------------------

BASH_TEMPLATE = r"""# bash completion for pytunnel                              -*- shell-script -*-
# @HEADER@
# Installed as share/bash-completion/completions/pytunnel.bash, where bash-completion
# finds it; or source it from ~/.bashrc. It needs only bash 4: no bash-completion
# helpers, and no Python start per TAB.

# Readline splits words at COMP_WORDBREAKS characters (= : @ among them): glue the pieces
# that touch back together, so "-o Key=val" and "user@host" arrive whole.
__pytunnel_words()
{
    local i piece line trimmed
    words=() cword=0
    if [[ -z ${COMP_LINE-} ]]; then
        words=("${COMP_WORDS[@]:0:COMP_CWORD+1}")
        cword=$COMP_CWORD
        return
    fi
    line=${COMP_LINE:0:COMP_POINT}
    for ((i = 0; i <= COMP_CWORD; i++)); do
        piece=${COMP_WORDS[i]-}
        trimmed=${line#"${line%%[![:space:]]*}"}
        if ((i > 0 && ${#trimmed} == ${#line})); then
            words[${#words[@]} - 1]+=$piece
        else
            words+=("$piece")
        fi
        line=${trimmed:${#piece}}
    done
    cword=$((${#words[@]} - 1))
}

# COMPREPLY from found[], each prefixed with $1, less the part of the word readline
# keeps (up to the last word-break character; "@" itself is replaced).
__pytunnel_reply()
{
    local keep= item
    if [[ -n ${COMP_LINE-} && -n ${COMP_WORDBREAKS-} && $cur == *[$COMP_WORDBREAKS]* ]]; then
        keep=${cur%"${cur##*[$COMP_WORDBREAKS]}"}
        [[ $keep == *@ ]] && keep=${keep%@}
    fi
    for item in "${found[@]}"; do
        item=$1$item
        COMPREPLY+=("${item#"$keep"}")
    done
}

__pytunnel_takes_value()
{
    case $1 in
        @VALUED@) return 0 ;;
    esac
    return 1
}

__pytunnel_is_flag()
{
    case $1 in
        @FLAGS@) return 0 ;;
    esac
    return 1
}

# A word of short options like -fN or -oKey=Value: sets opt to the one that takes a
# value, if any, and rest to what follows it in the word.
__pytunnel_short()
{
    local j c
    opt= rest=
    for ((j = 1; j < ${#1}; j++)); do
        c=-${1:j:1}
        if __pytunnel_takes_value "$c"; then
            opt=$c rest=${1:j+1}
            return 0
        fi
        __pytunnel_is_flag "$c" || return 1
    done
    return 1
}

# Host names from ssh_config Host lines (no patterns) and known_hosts (no hashed names).
__pytunnel_hosts()
{
    local config=~/.ssh/config i
    local -a files=()
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            --) break ;;
            -F) config=${words[i + 1]-} ;;
            -F?*) config=${words[i]#-F} ;;
        esac
    done
    [[ $config == "~/"* ]] && config=$HOME/${config#"~/"}
    [[ $config == /* ]] || config=./$config
    [[ $config != ./none && -f $config && -r $config ]] && files+=(kind=config "$config")
    [[ -f ~/.ssh/known_hosts && -r ~/.ssh/known_hosts ]] &&
        files+=(kind=known ~/.ssh/known_hosts)
    ((${#files[@]})) || return 0
    awk @HOSTS_AWK@ "${files[@]}" 2>/dev/null
}

# Adds to found[] the hosts that complete $1 ([user@]host; with $2 = list, a
# comma-separated list of them).
__pytunnel_host_words()
{
    local word=$1 lead= user= host
    if [[ $2 == list ]]; then
        lead=${word%"${word##*,}"}
        word=${word##*,}
    fi
    if [[ $word == *@* ]]; then
        user=${word%%@*}@
        word=${word#*@}
    fi
    while IFS= read -r host; do
        [[ $host == "$word"* ]] && found+=("$lead$user$host")
    done < <(__pytunnel_hosts)
}

__pytunnel_files()
{
    local item
    compopt -o filenames 2>/dev/null
    while IFS= read -r item; do
        found+=("$item")
    done < <(compgen -f -- "$1")
}

# -o: Key= from the supported keys (any case), then the values a key enumerates.
__pytunnel_option()
{
    local word=$1 key item
    if [[ $word != *=* ]]; then
        for item in @KEYS@; do
            [[ ${item,,} == "${word,,}"* ]] && found+=("$item=")
        done
        compopt -o nospace 2>/dev/null
        return
    fi
    key=${word%%=*}
    word=${word#*=}
    case ${key,,} in
@KEY_VALUES@
    esac
    found=("${found[@]/#/$key=}")
}

# Adds to found[] the values of option $1 that complete $2.
__pytunnel_value()
{
    local item
    case $1 in
@OPTION_VALUES@
    esac
}

# After "--": the command to run through the tunnel, completed as itself.
__pytunnel_command()
{
    local i helper
    for helper in _comp_command_offset _command_offset; do
        declare -F $helper >/dev/null || continue
        for ((i = 1; i < COMP_CWORD; i++)); do
            if [[ ${COMP_WORDS[i]} == -- ]]; then
                $helper $((i + 1))
                return
            fi
        done
    done
    if ((cword == $1 + 1)); then
        while IFS= read -r item; do
            found+=("$item")
        done < <(compgen -c -- "$cur")
        __pytunnel_reply ""
    else
        compopt -o default 2>/dev/null
    fi
}

_pytunnel()
{
    local words cword cur opt rest word item expect= positional=0 i
    local -a found=()
    __pytunnel_words
    cur=${words[cword]}
    COMPREPLY=()
    for ((i = 1; i < cword; i++)); do
        word=${words[i]}
        if [[ -n $expect ]]; then
            expect=
        elif [[ $word == -- ]]; then
            __pytunnel_command $i
            return
        elif [[ $word == --* ]]; then
            [[ $word != *=* ]] && __pytunnel_takes_value "$word" && expect=$word
        elif [[ $word == -?* ]]; then
            __pytunnel_short "$word" && [[ -z $rest ]] && expect=$opt
        else
            ((positional++))
        fi
    done

    if [[ -n $expect ]]; then
        __pytunnel_value "$expect" "$cur"
        __pytunnel_reply ""
    elif [[ $cur == --*=* ]]; then
        __pytunnel_value "${cur%%=*}" "${cur#*=}"
        __pytunnel_reply "${cur%%=*}="
    elif [[ $cur == -[!-]* ]] && __pytunnel_short "$cur" && [[ -n $rest ]]; then
        __pytunnel_value "$opt" "$rest"
        __pytunnel_reply "${cur%"$rest"}"
    elif [[ $cur == -* ]]; then
        for item in @OPTIONS@; do
            [[ $item == "$cur"* ]] && found+=("$item")
        done
        __pytunnel_reply ""
    elif ((positional == 0)); then
        __pytunnel_host_words "$cur"
        __pytunnel_reply ""
    fi
} &&
    complete -F _pytunnel pytunnel
"""


def _bash_case(arms: list[tuple[Iterable[str], str]], indent: str) -> str:
    lines = []
    for names, body in arms:
        names = tuple(names)
        if names:
            lines.append(f"{indent}{_pattern(names)}) {body} ;;")
    return "\n".join(lines) if lines else f"{indent}@@never@@) ;;"


def _bash_words(words: Iterable[str]) -> str:
    return " ".join(words)


def render_bash(model: Model) -> str:
    value_arms: list[tuple[Iterable[str], str]] = [
        (model.names_of(Kind.FILE), '__pytunnel_files "$2"'),
        (model.names_of(Kind.HOST), '__pytunnel_host_words "$2"'),
        (model.names_of(Kind.HOSTS), '__pytunnel_host_words "$2" list'),
        (
            model.names_of(Kind.USER),
            'while IFS= read -r item; do found+=("$item"); done < <(compgen -u -- "$2")',
        ),
        (model.names_of(Kind.KEY), '__pytunnel_option "$2"'),
    ]
    for option in model.options:
        if option.kind is Kind.CHOICE:
            words = _sh_quote(_bash_words(option.choices))
            value_arms.append(
                (
                    option.names,
                    f'while IFS= read -r item; do found+=("$item"); '
                    f'done < <(compgen -W {words} -- "$2")',
                )
            )
    key_arms: list[tuple[Iterable[str], str]] = []
    for key in model.keys:
        if key.values:
            words = _sh_quote(_bash_words(key.values))
            body = (
                f'while IFS= read -r item; do found+=("$item"); '
                f'done < <(compgen -W {words} -- "$word")'
            )
        elif key.kind is Kind.FILE:
            body = '__pytunnel_files "$word"'
        elif key.kind is Kind.HOST:
            body = '__pytunnel_host_words "$word"'
        elif key.kind is Kind.HOSTS:
            body = '__pytunnel_host_words "$word" list'
        else:
            continue
        key_arms.append(((key.name.lower(),), body))
    return _fill(
        BASH_TEMPLATE,
        HEADER=HEADER,
        VALUED=_pattern(model.valued()),
        FLAGS=_pattern(n for n in model.flags() if len(n) == 2),
        HOSTS_AWK=_indent(_sh_quote(HOSTS_AWK), "    ").lstrip(),
        KEYS=_bash_words(key.name for key in model.keys) or '""',
        KEY_VALUES=_bash_case(key_arms, " " * 8),
        OPTION_VALUES=_bash_case(value_arms, " " * 8),
        OPTIONS=_bash_words(sorted(model.names)) or '""',
    )


# -- zsh ----------------------------------------------------------------------------

ZSH_TEMPLATE = r"""#compdef pytunnel
# zsh completion for pytunnel.
# @HEADER@
# Installed as share/zsh/site-functions/_pytunnel: put that directory in $fpath before
# compinit runs.

# Host names from ssh_config Host lines (no patterns) and known_hosts (no hashed names).
(( $+functions[_pytunnel_hosts] )) ||
_pytunnel_hosts() {
  local config=~/.ssh/config i expl
  local -a files hosts
  for (( i = 2; i < CURRENT; i++ )); do
    case $words[i] in
      (--) break ;;
      (-F) config=$words[i+1] ;;
      (-F?*) config=${words[i]#-F} ;;
    esac
  done
  [[ $config == '~/'* ]] && config=$HOME/${config#'~/'}
  [[ $config != none && -f $config && -r $config ]] && files+=(kind=config $config:a)
  [[ -f ~/.ssh/known_hosts && -r ~/.ssh/known_hosts ]] && files+=(kind=known ~/.ssh/known_hosts)
  (( $#files )) && hosts=(${(f)"$(awk @HOSTS_AWK@ $files 2>/dev/null)"})
  _wanted hosts expl host compadd -a hosts
}

(( $+functions[_pytunnel_destination] )) ||
_pytunnel_destination() {
  compset -P '*@'
  _pytunnel_hosts
}

(( $+functions[_pytunnel_host_list] )) ||
_pytunnel_host_list() {
  compset -P '*,'
  compset -P '*@'
  _pytunnel_hosts
}

# -o: Key= from the supported keys (any case), then the values a key enumerates.
(( $+functions[_pytunnel_option] )) ||
_pytunnel_option() {
  local expl key
  local -a keys
  if [[ $PREFIX == *=* ]]; then
    key=${${PREFIX%%=*}:l}
    compset -P '*='
    case $key in
@KEY_VALUES@
      (*) _message -e values value ;;
    esac
  else
    keys=(
@KEYS@
    )
    _describe -t option-keys 'option key' keys -S '=' -M 'm:{a-zA-Z}={A-Za-z}'
  fi
}

_pytunnel() {
  integer dashdash=${words[(i)--]}
  # After "--": the command to run through the tunnel, completed as itself.
  if (( dashdash < CURRENT )); then
    shift $dashdash words
    (( CURRENT -= dashdash ))
    _normal
    return
  fi
  _arguments -s -S : \
@SPECS@
}

_pytunnel "$@"
"""


def _zsh_escape(text: str, chars: str = "[]:") -> str:
    """For the description (brackets and colons) or, with chars=":", the message part of
    an _arguments spec."""
    return "".join("\\" + c if c in chars or c == "\\" else c for c in text)


def _zsh_action(kind: Kind, choices: tuple[str, ...]) -> str:
    return {
        Kind.FILE: "_files",
        Kind.HOST: "_pytunnel_destination",
        Kind.HOSTS: "_pytunnel_host_list",
        Kind.USER: "_users",
        Kind.KEY: "_pytunnel_option",
        Kind.CHOICE: "(" + " ".join(choices) + ")",
    }.get(kind, " ")


def _zsh_specs(model: Model) -> list[str]:
    specs = []
    for option in model.options:
        if option.exits:
            exclude = "(- *)"
        elif len(option.names) > 1:
            exclude = "(" + " ".join(option.names) + ")"
        else:
            exclude = ""
        star = "*" if option.repeatable else ""
        desc = "[" + _zsh_escape(option.summary) + "]"
        for name in option.names:
            if option.metavar is None:
                spec = f"{exclude}{star}{name}{desc}"
            else:
                mark = "+" if not name.startswith("--") else "="
                message = _zsh_escape(option.metavar, ":")
                action = _zsh_action(option.kind, option.choices)
                spec = f"{exclude}{star}{name}{mark}{desc}:{message}:{action}"
            specs.append(spec)
    specs.append(f"1:{_zsh_escape(model.destination, ':')}:_pytunnel_destination")
    return specs


def render_zsh(model: Model) -> str:
    key_arms = []
    for key in model.keys:
        if key.values:
            action = "_wanted values expl value compadd -- " + " ".join(key.values)
        elif key.kind is Kind.FILE:
            action = "_files"
        elif key.kind is Kind.HOST:
            action = "_pytunnel_destination"
        elif key.kind is Kind.HOSTS:
            action = "_pytunnel_host_list"
        else:
            continue
        key_arms.append(f"      ({key.name.lower()}) {action} ;;")
    keys = ["      " + _sh_quote(f"{key.name}:{_summary(key.help)}") for key in model.keys]
    return _fill(
        ZSH_TEMPLATE,
        HEADER=HEADER,
        HOSTS_AWK=_indent(_sh_quote(HOSTS_AWK), "  ").lstrip(),
        KEY_VALUES="\n".join(key_arms) or "      (@@never@@) ;;",
        KEYS="\n".join(keys),
        SPECS=" \\\n".join("    " + _sh_quote(spec) for spec in _zsh_specs(model)),
    )


# -- fish ---------------------------------------------------------------------------

FISH_TEMPLATE = r"""# fish completion for pytunnel.
# @HEADER@
# Installed as share/fish/vendor_completions.d/pytunnel.fish, where fish looks.

# Host names from ssh_config Host lines (no patterns) and known_hosts (no hashed names).
function __pytunnel_hosts
    set -l config ~/.ssh/config
    set -l next_is_config 0
    for token in (commandline -opc)[2..-1]
        if test $next_is_config = 1
            set config $token
            set next_is_config 0
        else if test "$token" = --
            break
        else if test "$token" = -F
            set next_is_config 1
        else if string match -q -- '-F?*' $token
            set config (string sub -s 3 -- $token)
        end
    end
    set config (string replace -r -- '^~/' "$HOME/" $config)
    string match -q -- '/*' $config; or set config ./$config
    set -l files
    if test "$config" != ./none -a -f "$config" -a -r "$config"
        set -a files kind=config $config
    end
    if test -f ~/.ssh/known_hosts -a -r ~/.ssh/known_hosts
        set -a files kind=known ~/.ssh/known_hosts
    end
    set -q files[1]; and awk @HOSTS_AWK@ $files 2>/dev/null
end

# The word being completed, less short options it starts with (-Jhost, -oKey=Value):
# fish puts those back itself.
function __pytunnel_word
    string replace -r -- '^-[^-=,@]*?[@SHORT_VALUED@]' '' (commandline -ct)
end

# The current word completed as [user@]host, or the last of a [user@]host,... list.
function __pytunnel_host_words
    set -l lead (string replace -r -- '[^,@=]*$' '' (__pytunnel_word))
    for host in (__pytunnel_hosts)
        printf '%s%s\n' $lead $host
    end
end

# Is the word being completed the destination (no destination yet, no "--")?
function __pytunnel_wants_destination
    set -l valued @VALUED@
    set -l flags @FLAGS@
    set -l expect 0
    set -l positional 0
    for token in (commandline -opc)[2..-1]
        if test $expect = 1
            set expect 0
            continue
        end
        switch $token
            case --
                return 1
            case '--*=*'
            case '--*'
                contains -- $token $valued; and set expect 1
            case '-?*'
                set -l chars (string split '' -- (string sub -s 2 -- $token))
                for j in (seq (count $chars))
                    if contains -- -$chars[$j] $valued
                        test $j = (count $chars); and set expect 1
                        break
                    end
                    contains -- -$chars[$j] $flags; or break
                end
            case '*'
                set positional (math $positional + 1)
        end
    end
    test $expect = 0 -a $positional = 0
end

function __pytunnel_after_dashdash
    contains -- -- (commandline -opc)[2..-1]
end

# After "--": the command to run through the tunnel, completed as itself.
function __pytunnel_command
    set -l tokens (commandline -opc) (commandline -ct)
    set -l i (contains -i -- -- $tokens)
    __fish_complete_subcommand --commandline $tokens[(math $i + 1)..-1]
end

# -o: Key= from the supported keys, then the values a key enumerates.
function __pytunnel_option
    set -l word (__pytunnel_word)
    if not string match -q -- '*=*' $word
@KEYS@
        return
    end
    set -l key (string split -m 1 = -- $word)[1]
    set -l value (string split -m 1 = -- $word)[2]
    switch (string lower -- $key)
@KEY_VALUES@
    end
end

complete -c pytunnel -f
complete -c pytunnel -n __pytunnel_wants_destination -a '(__pytunnel_host_words)'
complete -c pytunnel -n __pytunnel_after_dashdash -a '(__pytunnel_command)'
@COMPLETES@
"""


def _fish_completes(model: Model) -> list[str]:
    lines = []
    for option in model.options:
        parts = ["complete -c pytunnel"]
        for name in option.names:
            if name.startswith("--"):
                parts.append(f"-l {name[2:]}")
            elif len(name) == 2:
                parts.append(f"-s {name[1:]}")
            else:
                parts.append(f"-o {name[1:]}")
        if option.metavar is not None:
            if option.kind is Kind.FILE:
                parts.append("-r -F")
            else:
                parts.append("-x")
            argument = {
                Kind.HOST: "(__pytunnel_host_words)",
                Kind.HOSTS: "(__pytunnel_host_words)",
                Kind.USER: "(__fish_complete_users)",
                Kind.KEY: "(__pytunnel_option)",
                Kind.CHOICE: " ".join(option.choices),
            }.get(option.kind)
            if argument:
                parts.append("-a " + _fish_quote(argument))
        parts.append("-d " + _fish_quote(option.summary))
        lines.append(" ".join(parts))
    return lines


def render_fish(model: Model) -> str:
    keys = "\n".join(
        "        printf '%s\\t%s\\n' "
        + _fish_quote(key.name + "=")
        + " "
        + _fish_quote(_summary(key.help))
        for key in model.keys
    )
    arms = []
    for key in model.keys:
        if key.values:
            body = "printf '%s\\n' $key=" + "{" + ",".join(key.values) + "}"
        elif key.kind is Kind.FILE:
            body = "printf '%s\\n' $key=(__fish_complete_path $value)"
        elif key.kind in (Kind.HOST, Kind.HOSTS):
            body = "__pytunnel_host_words"
        else:
            continue
        arms.append(f"        case {key.name.lower()}\n            {body}")
    return _fill(
        FISH_TEMPLATE,
        HEADER=HEADER,
        HOSTS_AWK=_indent(_fish_quote(HOSTS_AWK), "    ").lstrip(),
        VALUED=" ".join(model.valued()),
        FLAGS=" ".join(n for n in model.flags() if len(n) == 2),
        SHORT_VALUED="".join(n[1] for n in model.valued() if len(n) == 2),
        KEYS=keys or "        true",
        KEY_VALUES="\n".join(arms) or "        case ''",
        COMPLETES="\n".join(_fish_completes(model)),
    )


# -- the man page -------------------------------------------------------------------

# What SECURITY says about who can use the proxy: keep it to what the code does. Which
# one is used follows the CLI: the guarded text once --allow-open-proxy exists.
OPEN_PROXY_UNGUARDED = (
    "Without a bind address, `-D` listens on loopback only (127.0.0.1 and ::1): only "
    "programs on this machine can use the proxy, though every local user can. A bind "
    "address other than loopback, or `*` for every interface@GATEWAY@, makes pytunnel "
    "serve anyone who can reach that address. It asks SOCKS clients for no "
    "authentication yet, so each of them can use your SSH login to reach whatever the "
    "server can reach. Listen beyond loopback only on networks you trust, or behind a "
    "firewall."
)
OPEN_PROXY_GUARDED = (
    "Without a bind address, `-D` listens on loopback only (127.0.0.1 and ::1): only "
    "programs on this machine can use the proxy, though every local user can. Anyone "
    "who can reach a listener can use your SSH login to reach whatever the server can "
    "reach, so pytunnel refuses to listen on any other address (a bind address other "
    "than loopback, or `*` for every interface@GATEWAY@) with exit status @USAGE@, unless "
    "clients must log in (`--proxy-auth`) or `--allow-open-proxy` says to serve anyone. "
    "The proxy password crosses the network in the clear: SOCKS5 username/password and "
    "HTTP Basic authentication are not encrypted."
)

DESCRIPTION = [
    "`pytunnel` serves SOCKS4, SOCKS4a and SOCKS5 on local ports (`-D`) and carries each "
    "connection through an SSH `direct-tcpip` channel to the server named by the "
    "destination, which makes the onward connection: dynamic port forwarding, as "
    "`ssh -D` does. No command is run on the server.@HTTP@",
    "A client gets its reply only after the server has answered the channel request, "
    "and a failure reply says why: connection refused, host or network unreachable, "
    "prohibited by the server, timed out, or a general failure.",
    "The rest of SOCKS5 works against a stock server too. UDP ASSOCIATE gets a relay "
    "socket for as long as its TCP connection lasts: datagrams to port 53 travel as DNS "
    "over TCP through a `direct-tcpip` channel (to the address they were sent to, or to "
    "`--dns-server`), so DNS needs nothing on the server; other datagrams need "
    "`--udp-helper`, which runs a small relay on the server with python3 over an "
    "exec channel, and are otherwise dropped and counted. BIND (SOCKS5 and SOCKS4) asks "
    "the server to listen (`tcpip-forward`; the server must allow remote forwarding) "
    "and takes the first connection from the requested address.",
    "With `-R`, the server listens instead, and what connects to that port speaks SOCKS "
    "or HTTP to pytunnel, which connects from this machine: reverse dynamic forwarding, "
    "as `ssh -R` with a single port does, with the same replies, rules and password.",
    "Keepalives are on by default. When the SSH session is lost after it was up, "
    "pytunnel keeps its listeners open and reconnects, at once and then with exponential "
    "backoff; new requests wait for the session up to `--reconnect-wait` seconds, then "
    "fail. pytunnel never connects anywhere directly. A refused login or a rejected host "
    "key is never retried, and `--no-reconnect` exits instead, as ssh does.",
    "While the session is down, a request from a client starts a connection attempt at "
    "once (at most one a second) instead of waiting out the backoff. `--give-up-after` "
    "exits (status 255) once one outage has lasted that many seconds. SIGHUP reconnects "
    "now: new connections use the new session at once, and connections open on the old "
    "one finish on it (it is closed when the last one ends, or after `--drain` seconds, "
    "10 minutes if that is 0). SIGUSR1 writes one status line: the session's state and "
    "for how long, connections open, served, failed and rejected, bytes each way, "
    "reconnects and the time pytunnel has run (a `status` event with `--json`).",
    "pytunnel reads <~/.ssh/config> (or the file given with `-F`) for host aliases, "
    "users, ports, keys and `DynamicForward` lines. It takes keys from the ssh-agent, "
    "`-i` and the default key files, asks on the terminal for passphrases and passwords "
    "when it needs them (never with `BatchMode=yes`), and checks the server's host key "
    "against the known_hosts files (see SECURITY).",
    "On a terminal, pytunnel shows a live view of the session, the listeners and every "
    "connection on standard error; `q` quits (exit status 0, as SIGTERM) and Ctrl-C "
    "interrupts (130), both with a summary. Otherwise, and with `-f`, `-q`, `-E` or a command to "
    "run, it writes a line per event there (with `-q`, problems only). With `--json`, it "
    "writes one JSON object per event on standard output, the first one `ready` with "
    "every listener's port.",
    "With `--` <command> [<arg> ...], pytunnel waits until the tunnel is ready, runs the "
    "command with `ALL_PROXY` and the other variables under ENVIRONMENT pointing at it, "
    "and exits with the command's status when it ends.",
]

# Added to the first paragraph of DESCRIPTION when the listeners speak HTTP too (when a
# wrapped command gets http_proxy).
HTTP_SENTENCE = (
    " The same ports answer HTTP proxy requests (CONNECT, and plain http:// requests) and "
    "serve a proxy auto-config file at /proxy.pac."
)

O_INTRO = (
    "Keys are matched in any case; the value follows `=` or a space. Each key may be "
    "given more than once: the first value wins, except for @REPEATABLE@, whose values "
    "add up. Options given as flags win over `-o`, and `-o` wins over ssh_config. An "
    "unsupported key is an error (exit status @USAGE@). The keys:"
)

ENVIRONMENT = [
    (
        "NOTIFY_SOCKET",
        "When set, as systemd sets it for a `Type=notify` service, pytunnel sends "
        "`READY=1` there once the SSH session is up and every listener accepts connections, a "
        "`STATUS=` line when the session is lost, reconnects or comes back, and "
        "`STOPPING=1` when it stops. A name starting with `@` is in the abstract "
        "namespace.",
    ),
    ("SSH_AUTH_SOCK", "The ssh-agent to take keys from."),
]
PASSWORD_ENV_TEXT = (
    "The password `--proxy-auth` requires from clients, unless `--proxy-password-file` is given."
)
COMMAND_ENV_INTRO = (
    "For the command given after `--`, pytunnel sets these for its first loopback "
    "listener (its first listener if none is on loopback), shown here for one on "
    "127.0.0.1 port 1080:"
)


def _command_environment() -> list[tuple[str, str]]:
    """The variables pytunnel sets for a wrapped command, asked of the code itself, with
    the names that get the same value together."""
    listener = events.Listener("127.0.0.1", 1080)
    # With an empty environment, all that comes back is what pytunnel sets.
    with mock.patch.dict(os.environ, clear=True):
        try:
            env = app.command_environment([listener])
        except (AttributeError, TypeError) as exc:
            raise SystemExit(f"generate.py: cannot ask app.command_environment: {exc}") from exc
    by_value: dict[str, list[str]] = {}
    for name, value in env.items():
        by_value.setdefault(value, []).append(name)
    return [(", ".join(names), f"`{value}`") for value, names in by_value.items()]


def _environment() -> list[tuple[str, str]]:
    entries = list(ENVIRONMENT)
    password_env = getattr(cli, "PASSWORD_ENV", None)
    if isinstance(password_env, str):
        entries.append((password_env, PASSWORD_ENV_TEXT))
    return entries


FILES = [
    (
        "~/.ssh/config",
        "Per-user ssh_config(5), read for the destination unless `-F` names another file "
        "(or `none`).",
    ),
    (
        "~/.ssh/known_hosts",
        "Host keys the server's key is checked against, with <~/.ssh/known_hosts2>. "
        "`StrictHostKeyChecking=accept-new` (and `no`, and a yes to the question) adds new "
        "keys to the first `UserKnownHostsFile`, this one by default.",
    ),
    (
        "/etc/ssh/ssh_known_hosts",
        "System-wide host keys, with </etc/ssh/ssh_known_hosts2>.",
    ),
    ("~/.ssh/id_*", "Default private keys, used when no `-i` or `IdentityFile` is given."),
]


def _exit_statuses() -> list[tuple[str, str]]:
    return [
        (
            str(int(ExitStatus.OK)),
            "Stopped normally (SIGTERM); with `-f`, the tunnel is ready in the background.",
        ),
        (str(int(ExitStatus.USAGE)), "Usage or configuration error."),
        (
            str(int(ExitStatus.LISTEN)),
            "A listener could not be bound (address in use, no permission).",
        ),
        (
            str(int(ExitStatus.SSH)),
            "SSH failed: connection, host key or authentication, or the session was lost "
            "with `--no-reconnect`, or stayed down for `--give-up-after` seconds.",
        ),
        (str(int(ExitStatus.INTERRUPTED)), "Interrupted (Ctrl-C, SIGINT)."),
        (
            "N",
            "With `--` <command>: the command's own exit status (128+N if it died of signal N).",
        ),
    ]


# Each example: the text that introduces it, then the lines of the example itself.
EXAMPLES: list[tuple[str, list[str]]] = [
    (
        "Serve SOCKS on port 1080 through <host>, then set the browser's SOCKS proxy to "
        "127.0.0.1 port 1080, SOCKS v5, with names resolved by the proxy (Firefox: "
        "Proxy DNS when using SOCKS v5). Chromium resolves names through a SOCKS5 proxy "
        "by itself:",
        [
            "pytunnel -D 1080 user@host",
            "chromium --proxy-server=socks5://127.0.0.1:1080",
        ],
    ),
    (
        "Fetch a page only the far side can reach. Use `socks5h://`, where the proxy "
        "looks up the name: with `socks5://` or SOCKS4 the client looks it up itself, "
        "outside the tunnel:",
        [
            "curl --proxy socks5h://127.0.0.1:1080 https://intranet.example/",
            "export ALL_PROXY=socks5h://127.0.0.1:1080",
        ],
    ),
    (
        "An alias in <~/.ssh/config> keeps the details off the command line, and its "
        "`DynamicForward` lines add listeners to those given with `-D`. This listens on "
        "ports 1080 and 1081 and logs in to bastion.example.com as alice:",
        [
            "Host work",
            "    HostName bastion.example.com",
            "    User alice",
            "    IdentityFile ~/.ssh/id_work",
            "    DynamicForward 1081",
            "",
            "pytunnel -D 1080 work",
        ],
    ),
    (
        "Let programs on the server reach this machine's network: the server listens on "
        "its port 1080 (loopback only), and a curl run there goes out from here:",
        [
            "pytunnel -R 1080 user@host",
            "curl -x socks5h://127.0.0.1:1080 http://printer.lan/   # on the server",
        ],
    ),
    (
        "Send DNS and other UDP through SOCKS5: DNS as DNS over TCP to a resolver the "
        "server can reach, anything else through the helper run on the server:",
        ["pytunnel -D 1080 --dns-server 10.0.0.2 --udp-helper user@host"],
    ),
    (
        "In CI, run one command through the tunnel: `-D 0` picks a free port, the command "
        "finds it in `ALL_PROXY` and `PYTUNNEL_PORT`, and pytunnel exits with the "
        "command's status:",
        ["pytunnel -D 0 -o BatchMode=yes ci@bastion.example.com -- ./integration-tests"],
    ),
    (
        "A systemd service: pytunnel tells systemd it is ready through `NOTIFY_SOCKET` "
        "once the tunnel is up, so units ordered after it start only then. The unit runs "
        "as root unless `User=` says otherwise; that user's <~/.ssh> needs the key and the "
        "server's host key. Add `--retry-start` to keep trying when the server is down "
        "at boot:",
        [
            "[Unit]",
            "Description=SOCKS proxy through bastion",
            "Wants=network-online.target",
            "After=network-online.target",
            "",
            "[Service]",
            "Type=notify",
            "ExecStart=/usr/local/bin/pytunnel -D 1080 -o ServerAliveInterval=15 tunnel@bastion",
            "Restart=on-failure",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
        ],
    ),
]

HOST_KEYS = (
    "pytunnel checks the server's host key as ssh does, against <~/.ssh/known_hosts> "
    "and </etc/ssh/ssh_known_hosts>. A changed key is always refused (exit status @SSH@), "
    "naming the key type and its SHA256 fingerprint. An unknown key is up to "
    "`StrictHostKeyChecking`: unless it is set, pytunnel asks on the terminal, as ssh "
    "does, and refuses the key when there is no terminal or with `BatchMode=yes`; `yes` "
    "refuses it; `accept-new` records it, and so does `no`. A changed or `@revoked` key "
    "is refused whatever `StrictHostKeyChecking` says: where ssh with `no` still connects "
    "(without forwarding), a tunnel would carry everything past whoever holds that key."
)

SEE_ALSO = ["ssh(1)", "ssh-keygen(1)", "ssh_config(5)", "systemd.service(5)"]

_OPTION_TOKEN = re.compile(r"(?<![\w\\/=.-])(--?[A-Za-z0-9][\w-]*)")


def _escape(text: str, *, code: bool = False) -> str:
    """Plain text to roff text. In code every hyphen is a minus (\\-), so it can be
    copied; in prose only those of option names are."""
    text = text.replace("\\", "\\e")
    if code:
        text = text.replace("-", "\\-")
    else:
        text = _OPTION_TOKEN.sub(lambda m: m.group(1).replace("-", "\\-"), text)
    for char, glyph in (("'", "\\(aq"), ("`", "\\(ga"), ("~", "\\(ti"), ("^", "\\(ha")):
        text = text.replace(char, glyph)
    return text


def _inline(text: str) -> str:
    """Prose with `bold` (options, commands, values) and <italic> (names, files)."""
    out = []
    for part in re.split(r"(`[^`]+`|<[^<>\s][^<>]*>)", text):
        if len(part) > 1 and part[0] == "`" and part[-1] == "`":
            out.append(_bold(part[1:-1]))
        elif len(part) > 1 and part[0] == "<" and part[-1] == ">":
            out.append(_italic(part[1:-1]))
        else:
            out.append(_escape(part))
    return "".join(out)


def _line(text: str) -> str:
    """A roff text line: a leading dot or quote would start a request."""
    return "\\&" + text if text[:1] in (".", "'") else text


def _text(roff: str, width: int = 80) -> list[str]:
    """A paragraph of roff text as input lines of at most ``width`` bytes where it can,
    broken only at plain spaces (an escaped space must stay inside a line)."""
    lines: list[str] = []
    current = ""
    for word in re.split(r"(?<!\\) ", roff):
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return [_line(line) for line in lines]


def _bold(text: str) -> str:
    return "\\fB" + _escape(text, code=True) + "\\fR"


def _italic(text: str) -> str:
    return "\\fI" + _escape(text, code=True) + "\\fR"


def _option_tag(option: Option) -> str:
    names = ", ".join(_bold(name) for name in option.names)
    return names + (" " + _italic(option.metavar) if option.metavar else "")


def _sentence(text: str) -> str:
    text = text.strip()
    return text if not text or text[-1] in ".!?" else text + "."


def _synopsis(model: Model) -> list[str]:
    def order(name: str) -> tuple[bool, str, bool]:
        char = name[1]
        return (not char.isdigit(), char.lower(), char.islower())

    flags = sorted(
        (o.names[0] for o in model.options if o.metavar is None and len(o.names[0]) == 2),
        key=order,
    )
    items = []
    if flags:
        items.append("[" + _bold("-" + "".join(f[1] for f in flags)) + "]")
    for option in model.options:
        first = option.names[0]
        if option.metavar is None and len(first) == 2:
            continue
        item = _bold(first)
        if option.metavar is not None:
            item += "\\ " + _italic(option.metavar)
        items.append("[" + item + "]")
    items.append(_italic(model.destination))
    items.append(
        "[" + _bold("--") + "\\ " + _italic("command") + "\\ [" + _italic("arg") + "\\ ...]]"
    )
    return [".ad l", _bold(PROG), *items, ".ad"]


def _check_prose(model: Model, texts: Iterable[str]) -> None:
    """Prose names options by hand: fail loudly when one has left the CLI."""
    names = set(model.names) | {"--"}
    for text in texts:
        for token in re.findall(r"(?<![\w/=.-])(--?[A-Za-z][\w-]*)", text):
            if token not in names:
                raise SystemExit(
                    f"generate.py: the man page prose names {token}, which pytunnel no "
                    f"longer has; update the templates in completions/generate.py:\n  {text}"
                )


def _check_examples(model: Model) -> None:
    """The pytunnel command lines in EXAMPLES use only real options and -o keys."""
    keys = {key.name.lower() for key in model.keys}
    for _, lines in EXAMPLES:
        for line in lines:
            words = line.replace("ExecStart=", "").split()
            if not words or not words[0].endswith(PROG):
                continue
            args = words[1 : words.index("--") if "--" in words else len(words)]
            for i, arg in enumerate(args):
                if arg.startswith("-") and arg not in model.names:
                    raise SystemExit(f"generate.py: example uses unknown option {arg}: {line}")
                if arg == "-o" and args[i + 1].split("=")[0].lower() not in keys:
                    raise SystemExit(f"generate.py: example uses unknown -o key: {line}")


def render_man(model: Model) -> str:
    guarded = model.option("--allow-open-proxy") is not None
    guard = _fill(
        OPEN_PROXY_GUARDED if guarded else OPEN_PROXY_UNGUARDED,
        GATEWAY=", or `-g`" if model.option("-g") is not None else "",
        USAGE=str(int(ExitStatus.USAGE)),
    )
    environment = _environment()
    command_environment = _command_environment()
    speaks_http = any("http_proxy" in names.split(", ") for names, _ in command_environment)
    description = [_fill(text, HTTP=HTTP_SENTENCE if speaks_http else "") for text in DESCRIPTION]
    repeatable = [k.name for k in model.keys if k.repeatable]
    o_intro = _fill(
        O_INTRO,
        REPEATABLE=(
            ", ".join(f"`{k}`" for k in repeatable[:-1]) + " and " if len(repeatable) > 1 else ""
        )
        + (f"`{repeatable[-1]}`" if repeatable else "none"),
        USAGE=str(int(ExitStatus.USAGE)),
    )
    host_keys = _fill(HOST_KEYS, SSH=str(int(ExitStatus.SSH)))
    _check_prose(
        model,
        [
            *description,
            guard,
            o_intro,
            host_keys,
            COMMAND_ENV_INTRO,
            *(t for _, t in environment),
            *(t for _, t in FILES),
            *(t for _, t in _exit_statuses()),
            *(intro for intro, _ in EXAMPLES),
        ],
    )
    _check_examples(model)

    out = [
        f'.TH {PROG.upper()} 1 {MAN_DATE} "{PROG} {__version__}" "User Commands"',
        f'.\\" {HEADER}',
        # Option names and commands must not be hyphenated; prose can do without.
        ".nh",
        ".SH NAME",
        *_text(
            f"{PROG} \\- SSH dynamic port forwarding (a SOCKS proxy through SSH), like ssh \\-D"
        ),
        ".SH SYNOPSIS",
        *_synopsis(model),
        ".SH DESCRIPTION",
    ]
    for i, paragraph in enumerate(description):
        if i:
            out.append(".PP")
        out += _text(_inline(paragraph))

    out.append(".SH OPTIONS")
    for option in model.options:
        out += [".TP", _option_tag(option)]
        text = _sentence(option.help)
        if option.default is not None:
            text += f" Default: {option.default}."
        out += _text(_escape(text))
        if option.kind is Kind.KEY and model.keys:
            out += [".IP", *_text(_inline(o_intro)), ".RS"]
            for key in model.keys:
                out += [".TP", _bold(key.name)]
                text = _sentence(key.help) + f" Default: {key.default}."
                out += _text(_escape(text))
            out.append(".RE")

    out.append(".SH ENVIRONMENT")
    for name, text in environment:
        out += [".TP", ", ".join(_bold(n.strip()) for n in name.split(",")), *_text(_inline(text))]
    if command_environment:
        out += [".PP", *_text(_inline(COMMAND_ENV_INTRO))]
        for name, text in command_environment:
            out += [
                ".TP",
                ", ".join(_bold(n.strip()) for n in name.split(",")),
                *_text(_inline(text)),
            ]

    out.append(".SH FILES")
    for name, text in FILES:
        out += [".TP", _italic(name), *_text(_inline(text))]

    out.append(".SH EXIT STATUS")
    for status, text in _exit_statuses():
        out += [
            ".TP",
            _bold(status) if status.isdigit() else _italic(status),
            *_text(_inline(text)),
        ]

    out.append(".SH EXAMPLES")
    for i, (intro, lines) in enumerate(EXAMPLES):
        if i:
            out.append(".PP")
        out += [*_text(_inline(intro)), ".PP", ".RS 4", ".nf"]
        out += [_line(_escape(line, code=True)) if line else "" for line in lines]
        out += [".fi", ".RE"]

    out += [".SH SECURITY", *_text(_inline(host_keys)), ".PP", *_text(_inline(guard))]

    out.append(".SH SEE ALSO")
    out.append(",\n".join(_bold(ref.split("(")[0]) + "(" + ref.split("(")[1] for ref in SEE_ALSO))
    return "\n".join(out) + "\n"


# -- writing and checking -----------------------------------------------------------


def render(model: Model | None = None) -> dict[Path, str]:
    model = model or build_model()
    return {
        BASH: render_bash(model),
        ZSH: render_zsh(model),
        FISH: render_fish(model),
        MAN: render_man(model),
    }


def write(root: Path) -> list[Path]:
    """Write every file under ``root``; return those that changed."""
    changed = []
    for relative, text in render().items():
        path = root / relative
        if path.exists() and path.read_bytes() == text.encode():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode())
        changed.append(path)
    return changed


def check(root: Path) -> list[str]:
    """A unified diff for every file under ``root`` that differs from a fresh render."""
    diffs = []
    for relative, text in render().items():
        path = root / relative
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        if old != text:
            diffs.append(
                "".join(
                    difflib.unified_diff(
                        old.splitlines(True),
                        text.splitlines(True),
                        f"{relative} (committed)",
                        f"{relative} (generated)",
                    )
                )
            )
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 with a diff on drift"
    )
    parser.add_argument(
        "--output", type=Path, default=ROOT, help="directory to write under (the checkout)"
    )
    args = parser.parse_args(argv)
    if args.check:
        diffs = check(args.output)
        if diffs:
            sys.stdout.write("".join(diffs))
            print(
                "completions/man page are out of date: run python completions/generate.py",
                file=sys.stderr,
            )
            return 1
        return 0
    for path in write(args.output):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
