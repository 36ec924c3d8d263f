// Type-aware linting of all TypeScript in the tree (src, test, bench), run by .ci/run
// before the tests. typescript-eslint's strict type-checked set, with the exceptions below.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['dist/', 'node_modules/', '**/*.cjs'] },
  js.configs.recommended,
  ...tseslint.configs.strictTypeChecked,
  {
    languageOptions: { parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname } },
    rules: {
      // Numbers and booleans print as people expect in messages; objects and nullish values still may not.
      '@typescript-eslint/restrict-template-expressions': ['error', { allowNumber: true, allowBoolean: true }],
      // noUncheckedIndexedAccess makes every index T | undefined; `!` marks an index known to be in range.
      '@typescript-eslint/no-non-null-assertion': 'off',
      // `(line) => deps.err(line)` is a callback, not a value anyone reads.
      '@typescript-eslint/no-confusing-void-expression': ['error', { ignoreArrowShorthand: true }],
      // tsc's noUnusedLocals/Parameters already check this; `_name` is how the tree marks a deliberate discard.
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_', destructuredArrayIgnorePattern: '^_' }],
    },
  },
  {
    files: ['test/**/*.ts'],
    rules: {
      // vitest's asymmetric matchers (expect.any, expect.stringContaining) are typed any.
      '@typescript-eslint/no-unsafe-assignment': 'off',
      // `async () => value` is how a test hands a function to an API that takes one returning a Promise.
      '@typescript-eslint/require-await': 'off',
      // Clean-up guards against a beforeAll that failed half-way, which the declared types cannot say.
      '@typescript-eslint/no-unnecessary-condition': 'off',
    },
  },
  // Plain JavaScript (this file) is not in the TypeScript project.
  { files: ['**/*.js'], extends: [tseslint.configs.disableTypeChecked] },
);
