// The source account exists already and may live in another resource group or subscription: this
// module is deployed at its resource group and only adds a role assignment. It never changes the
// account itself.

param accountName string

@description('The function app\'s user-assigned identity.')
param principalId string

var roles = loadJsonContent('../roles.json')

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: accountName
}

// Storage Blob Data Contributor: the producer takes snapshots (Snapshot Blob, If-Match), writes
// their pending markers (metadata) and removes a snapshot whose request could not be queued;
// copies read the snapshots through a user-delegation SAS (Get User Delegation Key is in this
// role); an in-place restore writes, overwrites (after a snapshot) and deletes blobs; lease mode
// leases the live blob. No narrower built-in role allows snapshots and deletes together.
resource contributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, principalId, roles.storageBlobDataContributor)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output blobEndpoint string = account.properties.primaryEndpoints.blob
// ADLS Gen2 lists names in hierarchical order: the backup account mirrors it and
// LAKEGUARD_NAME_ORDER follows it.
output isHnsEnabled bool = account.properties.?isHnsEnabled ?? false
