import { policyJsonSchema } from '../../policy/schema.js';
import { Exit, parseFlags, type Command } from '../deps.js';

export const schema: Command<Record<string, never>> = {
  name: 'schema',
  summary: 'print the JSON Schema of policy files',
  help: `Usage: egressctl schema

Prints the JSON Schema (draft 2020-12) of a policy file, generated from the
same schema egressd validates with. Point your editor's YAML language server
at it, e.g. a first line in a policy file:
  # yaml-language-server: $schema=/usr/share/egressd/policy.schema.json

Exit status: 0.`,
  parse(argv) {
    parseFlags('schema', argv, {}, 0);
    return {};
  },
  run(_options, deps) {
    deps.out(JSON.stringify(policyJsonSchema(), null, 2));
    return Exit.Ok;
  },
};
