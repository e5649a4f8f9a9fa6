// The function app's user-assigned managed identity: one identity for the host (AzureWebJobsStorage)
// and lakeguard's three connections, so the roles are granted before the app starts and survive a
// redeployment of the app.

param name string
param location string
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
