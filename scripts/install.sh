#!/usr/bin/env bash
# Installs egressd from this checkout (run scripts/setup.sh first: it builds
# dist/ and fills node_modules/), as root:
#   scripts/install.sh [--root DIR] [--uninstall]
#
#   /usr/lib/egressd/           dist/, package.json, package-lock.json, README.md (the units' Documentation=), and
#                               node_modules/ with the production packages of
#                               package-lock.json only (copied from this
#                               checkout's node_modules: no network, no npm)
#   /usr/bin/egressctl          symlinks to the dist entry points (they carry
#   /usr/sbin/egressd           their own "#!/usr/bin/env node")
#   /usr/lib/systemd/system/    systemd/*.service and the other files of
#                               systemd/, each where dest_for() says
#   /etc/egressd/               policies/ (lists/ and their licences too)
#   /usr/lib/egressd/installed-files
#                               the record: every file, link and directory
#                               this script made, with the checksum of what it
#                               wrote ("f\tSHA256\tPATH", "l\tTARGET\tPATH",
#                               "d\t-\tPATH")
#
# A policy file an admin changed is never overwritten: while it still has
# the content recorded at install it is updated, otherwise it is kept and the
# shipped version is written beside it as FILE.dist (a file an admin deleted
# stays deleted). Running it twice changes nothing the second time. Files are
# written to a temporary name and renamed; /usr/lib/egressd is built beside
# the old one and swapped in by two renames, only when it differs.
#
# Without --root, where systemd is PID 1, it reloads systemd and enables and
# starts egressd-early and egressd (those whose units it installed). Where
# systemd is not PID 1 (containers), nothing is started: scripts/run.sh runs
# egressd in the foreground. With --root DIR it installs into DIR and touches
# nothing of the running system.
#
# --uninstall removes what the record lists, except files changed since they
# were installed (it names them), and the directories it made once they are
# empty; where systemd runs it stops and disables the units first. The rules
# egressd applied stay in force: "egressctl release" before --uninstall
# removes them.
#
# Exit codes: 0 done, 2 bad arguments, 3 cannot install (not root, no build),
# 4 installed, but a unit did not start (each is named; the others were started).
set -euo pipefail
umask 022

usage() { echo "usage: scripts/install.sh [--root DIR] [--uninstall]"; }
root='' uninstall=0
while (($#)); do
  case $1 in
    --root)
      (($# >= 2)) || { usage >&2; exit 2; }
      root=$2
      shift 2
      ;;
    --root=*) root=${1#--root=}; shift ;;
    --uninstall) uninstall=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
if ((EUID != 0)); then
  echo "install: must run as root (it writes /usr, /etc and talks to systemd)" >&2
  exit 3
fi
if [[ -n $root ]]; then
  [[ -d $root ]] || { echo "install: --root $root: not a directory" >&2; exit 2; }
  root=$(realpath "$root")
  [[ $root == / ]] && root=''
fi
src=$(cd "$(dirname "$0")/.." && pwd)

LIB=/usr/lib/egressd
RECORD=$LIB/installed-files
UNITDIR=/usr/lib/systemd/system
ETC=/etc/egressd
SYSTEMD_UNITS=(egressd-early.service egressd.service) # in start order

tmp=$(mktemp -d)
staging='' old_lib=''
trap 'rm -rf "$tmp" ${staging:+"$staging"} ${old_lib:+"$old_lib"}' EXIT
touch "$tmp/old" "$tmp/new"
[[ -f $root$RECORD ]] && grep -v '^#' "$root$RECORD" >"$tmp/old" || true

changes=0
not_started=()
say() { echo "install: $*"; }
changed() { say "$*"; changes=$((changes + 1)); }
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$tmp/new"; }
recorded() { awk -F'\t' -v t="$1" -v p="$2" '$1 == t && $3 == p { print $2; exit }' "$tmp/old"; }
sha() { sha256sum <"$1" | cut -d' ' -f1; }
# systemd only where it runs this machine, and never into a --root tree.
live_systemd() { [[ -z $root && -d /run/systemd/system ]]; }

# Makes each missing directory of $1 and records it, so uninstall can remove it.
ensure_dir() {
  local part path='' parts
  IFS=/ read -ra parts <<<"${1#/}"
  for part in "${parts[@]}"; do
    path+=/$part
    if [[ ! -d $root$path ]]; then
      mkdir -m 0755 "$root$path"
      record d - "$path"
    fi
  done
}

# Writes $1 to $2 (under root) with mode $3 unless it is already there: a
# temporary file in the same directory renamed over it.
put_file() {
  local from=$1 to=$2 mode=$3 t
  ensure_dir "$(dirname "$to")"
  if [[ ! -L $root$to && -f $root$to ]] && cmp -s "$from" "$root$to" && [[ $(stat -c %a "$root$to") == "${mode#0}" ]]; then
    :
  else
    [[ -e $root$to ]] && changed "updated $to" || changed "installed $to"
    t=$(mktemp "$root$(dirname "$to")/.$(basename "$to").XXXXXX")
    cp "$from" "$t"
    chmod "$mode" "$t"
    mv -f "$t" "$root$to"
  fi
  record f "$(sha "$from")" "$to"
}

put_link() {
  local target=$1 to=$2
  ensure_dir "$(dirname "$to")"
  if [[ ! -L $root$to || $(readlink "$root$to") != "$target" ]]; then
    changed "linked $to -> $target"
    ln -s "$target" "$root$to.new.$$"
    mv -fT "$root$to.new.$$" "$root$to"
  fi
  record l "$target" "$to"
}

# Where a file of systemd/ goes. Units go to /usr/lib/systemd/system; a
# tmpfiles or sysusers snippet and a D-Bus policy go where their tools read
# them; an .nft file or a script goes where a unit names it under /usr
# (egressd-early's script and fail-safe ruleset), else beside the units.
dest_for() {
  local name=$1 named
  case $name in
    *tmpfiles*.conf) echo /usr/lib/tmpfiles.d/egressd.conf ;;
    *sysusers*.conf) echo /usr/lib/sysusers.d/egressd.conf ;;
    org.*.conf) echo "/usr/share/dbus-1/system.d/$name" ;;
    *.policy) echo "/usr/share/polkit-1/actions/$name" ;;
    *.nft | *.sh)
      named=$(cat "$src"/systemd/*.service 2>/dev/null | grep -o "/usr/[^[:space:]\"']*/$name" | head -1 || true)
      echo "${named:-$UNITDIR/$name}"
      ;;
    *) echo "$UNITDIR/$name" ;;
  esac
}

# Old record entries (files and links) the new record no longer has: removed
# when they still hold what was installed, kept (and named) otherwise.
remove_unrecorded() {
  local type value path kind
  awk -F'\t' 'FILENAME == ARGV[1] { if ($1 != "d") keep[$3] = 1; next } $1 != "d" && !($3 in keep)' "$tmp/new" "$tmp/old" >"$tmp/gone"
  : >"$tmp/gone-files"
  while IFS=$'\t' read -r type value path; do
    if [[ $type == l ]]; then
      if [[ -L $root$path && $(readlink "$root$path") == "$value" ]]; then
        rm -f "$root$path"
        changed "removed $path"
      fi
    elif [[ -f $root$path && ! -L $root$path ]]; then
      printf '%s\0' "$root$path" >>"$tmp/gone-files"
    fi
  done <"$tmp/gone"
  # One sha256sum for them all: the build alone is some two thousand files.
  xargs -0 -r sha256sum <"$tmp/gone-files" >"$tmp/gone-sums"
  awk -F'\t' -v r="$root" 'FILENAME == ARGV[1] { if ($1 == "f") want[r $3] = $2; next }
    { p = substr($0, 67); print (want[p] == substr($0, 1, 64) ? "same" : "changed") "\t" p }' "$tmp/gone" "$tmp/gone-sums" >"$tmp/gone-verdicts"
  local removed_lib=0
  : >"$tmp/gone-lib"
  while IFS=$'\t' read -r kind path; do
    if [[ $kind == same && $path == "$root$LIB"/* ]]; then
      printf '%s\0' "$path" >>"$tmp/gone-lib"
      removed_lib=$((removed_lib + 1))
    elif [[ $kind == same ]]; then
      rm -f "$path"
      changed "removed ${path#"$root"}"
    elif [[ $path == "$root$ETC"/* ]]; then
      say "kept ${path#"$root"}: changed by an admin"
    else
      say "kept ${path#"$root"}: changed since it was installed"
    fi
  done <"$tmp/gone-verdicts"
  xargs -0 -r rm -f <"$tmp/gone-lib"
  ((removed_lib == 0)) || changed "removed $removed_lib files of $LIB"
}

# Removes the recorded directories that are empty, deepest first (uninstall);
# records those that still exist (install).
settle_dirs() {
  local path
  awk -F'\t' '$1 == "d" { print $3 }' "$tmp/old" "$tmp/new" | LC_ALL=C sort -ru >"$tmp/dirs"
  grep -v '^d' "$tmp/new" >"$tmp/new-files" || true
  mv "$tmp/new-files" "$tmp/new"
  while IFS= read -r path; do
    [[ -d $root$path ]] || continue
    if ((uninstall)); then
      rmdir "$root$path" 2>/dev/null || say "kept $path: not empty"
    else
      record d - "$path"
    fi
  done <"$tmp/dirs"
}

write_record() {
  local t
  {
    echo "# egressd install record, written by scripts/install.sh; read by --uninstall"
    LC_ALL=C sort -t$'\t' -k3,3 -k1,1 -u "$tmp/new"
  } >"$tmp/record"
  cmp -s "$tmp/record" "$root$RECORD" && return
  t=$(mktemp "$root$LIB/.installed-files.XXXXXX")
  cp "$tmp/record" "$t"
  chmod 0644 "$t"
  mv -f "$t" "$root$RECORD"
}

# A signature of a tree: every entry's type, mode, name and link target, and
# every file's checksum; the record inside it is left out.
tree_sig() {
  (
    cd "$1"
    find . -path ./installed-files -prune -o -printf '%y %m %p %l\n' | LC_ALL=C sort
    find . -type f ! -path ./installed-files -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
  )
}

# The production packages of package-lock.json that are on disk: what
# `npm ci --omit=dev` would install, without the network.
production_packages() {
  node -e '
    const fs = require("fs"), path = require("path");
    const lock = JSON.parse(fs.readFileSync(path.join(process.argv[1], "package-lock.json"), "utf8"));
    let missing = false;
    for (const [dir, pkg] of Object.entries(lock.packages)) {
      if (!dir || pkg.dev || /node_modules\/.*node_modules\//.test(dir)) continue; // nested ones come with their parent
      if (fs.existsSync(path.join(process.argv[1], dir))) console.log(dir);
      else if (!pkg.optional) { console.error(`install: ${dir} is missing: run scripts/setup.sh`); missing = true; }
    }
    process.exit(missing ? 3 : 0);
  ' "$src"
}

install_build() {
  local count f to
  for f in dist/cli/main.js dist/daemon/main.js node_modules; do
    [[ -e $src/$f ]] || { echo "install: $src/$f is missing: run scripts/setup.sh first" >&2; exit 3; }
  done
  if [[ -d $src/src && -n $(find "$src/src" -newer "$src/dist/cli/main.js" -name '*.ts' -print -quit) ]]; then
    say "warning: dist/ is older than src/ (npm run build rebuilds it)"
  fi
  # Built outside the tree and copied in only when it differs, so that an
  # install that changes nothing changes no directory either.
  local build=$tmp/build
  mkdir -m 0755 "$build"
  cp -R --preserve=mode "$src/dist" "$src/package.json" "$src/package-lock.json" "$src/README.md" "$build/"
  production_packages >"$tmp/packages"
  (cd "$src" && tr '\n' '\0' <"$tmp/packages" | xargs -0 -r cp -R --parents --preserve=mode -t "$build")
  count=$(wc -l <"$tmp/packages")
  # A file of systemd/ that a unit names inside the build (an .nft ruleset) is part of the build.
  for f in "$src"/systemd/*; do
    [[ -f $f ]] || continue
    to=$(dest_for "$(basename "$f")")
    [[ $to == "$LIB"/* ]] || continue
    mkdir -p "$build/$(dirname "${to#"$LIB"/}")"
    cp "$f" "$build/${to#"$LIB"/}"
    chmod 0644 "$build/${to#"$LIB"/}"
  done

  (cd "$build" && find . -mindepth 1 -type d -printf 'd\t-\t%P\n' && find . -type l -printf 'l\t%l\t%P\n' && find . -type f -print0 | xargs -0 -r sha256sum | sed 's|^\([0-9a-f]*\)  \./|f\t\1\t|') |
    awk -F'\t' -v l="$LIB" '{ print $1 "\t" $2 "\t" l "/" $3 }' >>"$tmp/new"

  if [[ ! -d $root$LIB ]] || [[ $(tree_sig "$build") != "$(tree_sig "$root$LIB")" ]]; then
    ensure_dir "$(dirname "$LIB")"
    staging=$(mktemp -d "$root$(dirname "$LIB")/.egressd.XXXXXX")
    cp -R --preserve=mode "$build/." "$staging"
    chmod 0755 "$staging"
    # Keep the old record with the new tree until the new one is written.
    [[ -f $root$RECORD ]] && cp -p "$root$RECORD" "$staging/installed-files"
    if [[ -d $root$LIB ]]; then
      old_lib=$(mktemp -u "$root$(dirname "$LIB")/.egressd.old.XXXXXX")
      mv -T "$root$LIB" "$old_lib"
      mv -T "$staging" "$root$LIB"
      rm -rf "$old_lib"
      changed "updated $LIB (dist, $count npm packages)"
    else
      mv -T "$staging" "$root$LIB"
      record d - "$LIB"
      changed "installed $LIB (dist, $count npm packages)"
    fi
  fi
  staging='' old_lib=''
  put_link ../lib/egressd/dist/cli/main.js /usr/bin/egressctl
  put_link ../lib/egressd/dist/daemon/main.js /usr/sbin/egressd
}

install_systemd_files() {
  local f to before=$changes
  for f in "$src"/systemd/*.service "$src"/systemd/*.conf "$src"/systemd/*.nft "$src"/systemd/*.policy; do
    [[ -f $f ]] || continue
    to=$(dest_for "$(basename "$f")")
    [[ $to == "$LIB"/* ]] || put_file "$f" "$to" 0644
  done
  # Units each user's systemd runs (egressctl notify).
  for f in "$src"/systemd/user/*.service; do
    [[ -f $f ]] && put_file "$f" "/usr/lib/systemd/user/$(basename "$f")" 0644
  done
  units_changed=$((changes - before))
}

# One shipped policy file: installed, updated while unchanged by an admin,
# otherwise kept with the shipped version beside it as .dist.
install_policy() {
  local from=$1 to=$2 new was now
  new=$(sha "$from")
  was=$(recorded f "$to")
  if [[ ! -e $root$to ]]; then
    if [[ -n $was ]]; then
      say "not restored $to: an admin removed it"
      record f "$was" "$to"
      return
    fi
    put_file "$from" "$to" 0644
    return
  fi
  now=$(sha "$root$to")
  if [[ $now == "$new" || $now == "$was" ]]; then
    put_file "$from" "$to" 0644
  else
    [[ -n $was ]] && record f "$was" "$to"
    put_file "$from" "$to.dist" 0644
    say "kept $to: changed by an admin; the shipped version is $to.dist"
  fi
}

install_policies() {
  local f before=$changes
  ensure_dir "$ETC"
  while IFS= read -r -d '' f; do
    install_policy "$src/policies/$f" "$ETC/$f"
  done < <(cd "$src/policies" && find . -type f -printf '%P\0' | LC_ALL=C sort -z)
  policies_changed=$((changes - before))
}

start_units() {
  local u
  if [[ -n $root ]]; then
    say "installed into $root; the running system was not touched"
    return
  fi
  if ! live_systemd; then
    say "systemd is not PID 1 here: nothing was enabled or started; scripts/run.sh runs egressd in the foreground"
    return
  fi
  command -v systemd-sysusers >/dev/null && [[ -f /usr/lib/sysusers.d/egressd.conf ]] && systemd-sysusers egressd.conf
  command -v systemd-tmpfiles >/dev/null && [[ -f /usr/lib/tmpfiles.d/egressd.conf ]] && systemd-tmpfiles --create egressd.conf
  ((units_changed)) && systemctl daemon-reload
  for u in "${SYSTEMD_UNITS[@]}"; do
    [[ -f $UNITDIR/$u ]] || continue
    systemctl enable --quiet "$u"
    if [[ $u == egressd.service ]]; then
      if ((build_changed || units_changed)); then
        systemctl try-restart "$u" || true
      elif ((policies_changed)); then
        systemctl try-reload-or-restart "$u" || true
      fi
    fi
    # One unit that does not start must not keep the next from starting: egressd
    # applies the policy whatever egressd-early managed to load.
    if systemctl start "$u"; then
      say "enabled and started $u"
    else
      say "warning: $u was enabled but did not start (systemctl status $u says why)"
      not_started+=("$u")
    fi
  done
  return 0
}

stop_units() {
  local u units=()
  live_systemd || return 0
  for u in "${SYSTEMD_UNITS[@]}"; do
    [[ -n $(recorded f "$UNITDIR/$u") ]] && units+=("$u")
  done
  ((${#units[@]})) && systemctl disable --now --quiet "${units[@]}" && say "stopped and disabled ${units[*]}"
  return 0
}

if ((uninstall)); then
  if [[ ! -f $root$RECORD ]]; then
    say "nothing to remove: no record at $root$RECORD"
    exit 0
  fi
  stop_units
  remove_unrecorded
  rm -f "$root$RECORD"
  settle_dirs
  live_systemd && systemctl daemon-reload
  say "uninstalled from ${root:-/}"
  [[ -n $root ]] || say "the rules egressd applied, if any, stay in force: \`nft delete table inet egressd\` removes them"
  exit 0
fi

before=$changes
install_build
build_changed=$((changes - before))
install_systemd_files
install_policies
remove_unrecorded
settle_dirs
write_record
if ((changes == 0)); then
  say "nothing to change: egressd is installed in ${root:-/} as this checkout has it"
else
  say "$changes changes in ${root:-/}"
fi
start_units
((${#not_started[@]} == 0)) || exit 4
