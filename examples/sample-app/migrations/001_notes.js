'use strict';
// The notes table, with one note to start with.
module.exports = {
  async up(db) {
    await db.query('CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)');
    await db.query("INSERT INTO notes (body) VALUES ('first note')");
  },
  async down(db) {
    await db.query('DROP TABLE notes');
  },
};
