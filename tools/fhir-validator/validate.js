#!/usr/bin/env node
// Validates FHIR R4 resources against HL7's R4 definitions with the npm package `fhir` (FHIR.js), which shares no
// code with the service. Usage: node validate.js FILE... (or `-` for stdin); each input is one JSON resource.
// Prints every message (errors and warnings; elements unknown to R4 are errors), then a summary line.
// Exit status: 0 no errors, 1 errors, 2 an input that is not JSON.
"use strict";

const fs = require("fs");
const { Fhir } = require("fhir");

const fhir = new Fhir(); // R4
let errors = 0;
for (const name of process.argv.slice(2)) {
  let resource;
  try {
    resource = JSON.parse(fs.readFileSync(name === "-" ? 0 : name, "utf8"));
  } catch (error) {
    console.error(`${name}: not JSON: ${error.message}`);
    process.exit(2);
  }
  const { messages } = fhir.validate(resource, { errorOnUnexpected: true });
  for (const message of messages) {
    console.log(`${name}: ${message.severity} at ${message.location}: ${message.message}`);
    if (message.severity === "error" || message.severity === "fatal") {
      errors += 1;
    }
  }
}
console.log(`${process.argv.length - 2} resources, ${errors} errors`);
process.exit(errors ? 1 : 0);
