/**
 * Matches cgroup paths against a selector's glob, one path segment per glob
 * segment: "*" and "?" never cross a "/", so a glob names cgroups at exactly
 * one depth — the depth nft's `socket cgroupv2 level N` looks at. "#" (not
 * allowed in policy globs, used by the Flatpak selector) is one or more
 * digits, so that "app-flatpak-org.foo.Bar-#.scope" does not also match the
 * app org.foo.Bar-beta.
 */
export function cgroupGlobMatcher(glob: string): (path: string) => boolean {
  const pattern = glob
    .split('/')
    .map((segment) =>
      segment
        .replace(/[.+^${}()|[\]\\]/g, '\\$&')
        .replace(/\*/g, '[^/]*')
        .replace(/\?/g, '[^/]')
        .replace(/#/g, '[0-9]+'),
    )
    .join('/');
  const regex = new RegExp(`^${pattern}$`);
  return (path) => regex.test(path.replace(/^\/+|\/+$/g, ''));
}

/**
 * The ancestor of `path` that `socket cgroupv2 level N` looks at, when it
 * matches the glob: a process deeper in the tree matches too. Undefined for
 * a path shallower than the glob's level, or an ancestor it does not match.
 */
export function cgroupAncestorMatching(path: string, selector: { readonly glob: string; readonly level: number }): string | undefined {
  const segments = path.replace(/^\/+|\/+$/g, '').split('/');
  if (segments.length < selector.level) return undefined;
  const ancestor = segments.slice(0, selector.level).join('/');
  return cgroupGlobMatcher(selector.glob)(ancestor) ? ancestor : undefined;
}
