export { type AdminLogin, adminConsole, authenticateAdmin, isAdminDatabase } from "./AdminConsole.ts"
export { AdminControl } from "./AdminControl.ts"
