// The harness is product code (src/lab); the tests import it from here.
export * from '../../src/lab/sys.js';
