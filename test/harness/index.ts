// The harness is product code (src/lab), which `egressctl try` runs too; the tests import it from here.
export * from '../../src/lab/index.js';
